"""`nichooks install` / `nichooks uninstall`: put our entry points exactly where each
caller looks (docs/architecture.md, "Interfaces"), and take away only what we put there.

Each installed file is a small wrapper that execs our entry point by absolute path
(Ganeti's PATH lacks our virtualenv, and a PATH lookup of `kvm-ifup` could find
Ganeti's own script, which execs `kvm-vif-bridge` again: a loop). The wrapper also
refuses to run inside itself, so no chain of stock and custom scripts can loop.

What was made is recorded in `<root>/var/lib/nichooks/installed.json` (not /run: it
must survive a reboot, or uninstall would forget what is ours). A file we did not
make is never overwritten: it is kept and reported, unless `--force`, which moves it
to `<path>.nichooks-backup` first; uninstall puts such backups back.

Everything here runs as root and writes scripts that root runs on every hook, so the
manifest and the command line are treated as data that may be hostile: every path
must stay inside `--root`, every value in a wrapper is shell-quoted, and whatever we
create gets an explicit mode rather than whatever the caller's umask makes of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nichooks.errors import InvalidInput, PlumbingError
from nichooks.trust import make_dirs

MANIFEST = Path("var/lib/nichooks/installed.json")
BACKUP_SUFFIX = ".nichooks-backup"
# Ganeti 3.2 looks for network/<mode>/{up,down} for these of its own NIC modes.
GANETI_NETWORK_MODES = ("bridged", "openvswitch", "routed")
DIR_MODE = 0o755        # directories we create: readable by all, writable by root only
WRAPPER_MODE = 0o755
MANIFEST_MODE = 0o644
# The first bytes of every wrapper any version has written; uninstall removes only files
# that start with them, so a manifest entry cannot name, say, /etc/shadow with its digest.
WRAPPER_HEAD = b"#!/bin/sh\n# Installed by `nichooks install`;"

# (caller, path under root, our entry point)
GANETI_TARGETS = [
    ("ganeti", "etc/ganeti/kvm-vif-bridge", "kvm-ifup"),     # stock 2.x-3.1: exec'd, env only
    ("ganeti", "etc/ganeti/kvm-ifup-custom", "kvm-ifup"),    # the ifdown patch (GRNET)
    ("ganeti", "etc/ganeti/kvm-ifdown-custom", "kvm-ifdown"),
] + [("ganeti", f"etc/ganeti/network/{mode}/{action}", entry)   # 3.2's per-mode layout
     for mode in GANETI_NETWORK_MODES for action, entry in (("up", "kvm-ifup"), ("down", "kvm-ifdown"))]
XEN_DEFAULT = "etc/xen/scripts/vif-custom"                      # exec'd by stock vif-ganeti

Record = dict[str, str | None]


def wrapper(entry: Path, installed_as: str) -> str:
    """The sh text of one wrapper.

    Every value is `shlex.quote`d: a path is data, and `--xen-path 'vif-custom;echo X'`
    must name a file, not run `echo X` as root on every hook. The loop message goes
    through `printf '%s'` with the path as an argument, so neither `$(...)` in a path
    nor a backslash (dash's echo interprets them) can change what is printed.
    """
    name = shlex.quote(installed_as)
    return f"""#!/bin/sh
# Installed by `nichooks install`; `nichooks uninstall` removes it. Do not edit:
# a changed file is no longer ours and uninstall will leave it.
if [ -n "${{NICHOOKS_WRAPPED:-}}" ]; then
    printf 'nichooks: %s was called again from within %s: refusing to loop\\n' {name} "$NICHOOKS_WRAPPED" >&2
    exit 1
fi
NICHOOKS_WRAPPED={name}
export NICHOOKS_WRAPPED
exec {shlex.quote(str(entry))} "$@"
"""


def _digest(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


@dataclass
class Report:
    lines: list[str]
    kept: int = 0

    def say(self, line: str) -> None:
        self.lines.append(line)


class Installer:
    def __init__(self, root: Path, bin_dir: Path, dry_run: bool = False) -> None:
        # Absolute, so that a wrapper execs its entry point from any cwd and a recorded
        # backup path means the same thing to a later uninstall run from elsewhere.
        self.root = root.absolute()
        self.bin_dir = bin_dir.absolute()
        self.dry_run = dry_run
        self.manifest_path = self.root / MANIFEST

    def _outside(self, rel: str) -> str | None:
        """Why `root / rel` is not a file inside the root, or None if it is.

        Checked lexically first (`..`, and absolute paths, which pathlib's `/` would
        take as they are), then by resolving the parent directory, which catches a
        symlinked component leading out. The last component is not resolved: a
        symlink there is a file we did not make (kept), never followed.
        """
        pure = PurePosixPath(rel)
        if "\0" in rel or not pure.parts:
            return "is not a file name"
        if pure.is_absolute():
            return "is an absolute path, not one relative to the root"
        if ".." in pure.parts:
            return "contains '..'"
        real_root = self.root.resolve()
        parent = (self.root / pure).parent.resolve()
        if parent != real_root and real_root not in parent.parents:
            return f"leads outside {self.root} (through a symlink, to {parent})"
        return None

    def _backup_of(self, rel: str) -> Path:
        path = self.root / rel
        return path.with_name(path.name + BACKUP_SUFFIX)

    def _load(self) -> dict[str, Record]:
        """The manifest, every entry checked before anything is changed.

        A crafted manifest must not steer root: each installed path must lie inside
        the root, and each backup must be that path's own `<name>.nichooks-backup`
        beside it, the only name install ever records. One bad entry refuses the
        whole run, so nothing is half undone on the word of a file we cannot trust.
        """
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidInput(str(self.manifest_path), f"not JSON ({exc})") from None
        files = data.get("files", {}) if isinstance(data, dict) else None
        if not isinstance(files, dict):
            raise InvalidInput(str(self.manifest_path), 'no "files" object')
        out: dict[str, Record] = {}
        for rel, record in files.items():
            where = f"{self.manifest_path}: entry {rel!r}"
            if not isinstance(record, dict) or not all(
                    isinstance(v, str) or v is None for v in record.values()):
                raise InvalidInput(where, "not an object of strings")
            problem = self._outside(rel)
            if problem:
                raise InvalidInput(where, f"{problem}: refusing to act on this manifest")
            backup = record.get("backup")
            if backup is not None:
                expected = self._backup_of(rel)
                given = Path(backup)
                if given.name != expected.name or given.parent.resolve() != expected.parent.resolve():
                    raise InvalidInput(where, f"backup {backup!r} is not {expected}: "
                                       "refusing to act on this manifest")
            out[rel] = dict(record)
        return out

    def _save(self, files: dict[str, Record]) -> None:
        if self.dry_run:
            return
        make_dirs(self.manifest_path.parent, DIR_MODE)
        _write_file(self.manifest_path, json.dumps({"files": files}, indent=2, sort_keys=True) + "\n",
                    MANIFEST_MODE)

    def targets(self, ganeti: bool, xen: bool, xen_path: str | None) -> list[tuple[str, str, str]]:
        out = list(GANETI_TARGETS) if ganeti else []
        if xen:
            rel = (xen_path or "/" + XEN_DEFAULT).lstrip("/")
            problem = self._outside(rel)
            if problem:
                raise InvalidInput("--xen-path", f"{xen_path!r} {problem}")
            out.append(("xen", rel, "vif-ganeti"))
        return out

    def _check(self, targets: list[tuple[str, str, str]]) -> None:
        """Refuse before anything is moved or written: a wrapper whose entry point is
        missing would fail every hook, and a target outside the root would be written
        where the operator did not ask."""
        for _caller, rel, entry_name in targets:
            problem = self._outside(rel)
            if problem:
                raise InvalidInput(f"target {rel!r}", problem)
            path, entry = self.root / rel, self.bin_dir / entry_name
            if path.resolve() == entry.resolve():
                continue  # skipped below; nothing will exec it
            if not entry.exists():
                raise PlumbingError(f"entry point {entry} does not exist: nothing installed")
            if not entry.is_file() or not os.access(entry, os.X_OK):
                raise PlumbingError(f"entry point {entry} is not an executable file: nothing installed")

    def install(self, targets: list[tuple[str, str, str]], force: bool) -> Report:
        """Install a wrapper at each target.

        `--force` moves a foreign file to `<path>.nichooks-backup`, but never onto an
        existing one: that file may be the only copy of what a previous `--force`
        moved aside (the manifest records one backup per path, and uninstall restores
        exactly that one). Numbering a second backup would leave uninstall unable to
        say which to restore, so the file is kept and reported instead, for the
        operator to decide. The move is a hard link then an unlink, which fails
        rather than replaces if the backup appears in between.
        """
        report = Report([])
        files = self._load()
        self._check(targets)
        for caller, rel, entry_name in targets:
            path = self.root / rel
            entry = self.bin_dir / entry_name
            if path.resolve() == entry.resolve():
                report.say(f"skipped {path}: it is our own entry point")
                continue
            text = wrapper(entry, "/" + rel)
            record = files.get(rel)
            exists = _present(path)
            ours = record is not None and exists and _is_wrapper_with(path, record.get("sha256"))
            backup = record.get("backup") if record else None
            if exists and not ours:
                if not force:
                    report.say(f"kept {path}: not made by nichooks; left to the operator "
                               "(--force moves it aside and installs ours)")
                    report.kept += 1
                    continue
                backup_path = self._backup_of(rel)
                refusal = _cannot_move_aside(path, backup_path)
                if refusal is None and not self.dry_run:
                    try:
                        os.link(path, backup_path, follow_symlinks=False)
                    except FileExistsError:
                        refusal = f"{backup_path} already exists"
                    else:
                        os.unlink(path)
                if refusal is not None:
                    report.say(f"kept {path}: not made by nichooks, and {refusal}; "
                               "move one of them away and install again")
                    report.kept += 1
                    continue
                backup = str(backup_path)
                report.say(f"{'would move' if self.dry_run else 'moved'} {path} to {backup}")
            report.say(f"{'would install' if self.dry_run else 'installed'} {path} -> {entry}")
            if not self.dry_run:
                make_dirs(path.parent, DIR_MODE)
                _write_file(path, text, WRAPPER_MODE)
            files[rel] = {"caller": caller, "entry": str(entry), "sha256": _digest(text),
                          "backup": backup}
        self._save(files)
        return report

    def uninstall(self, callers: set[str]) -> Report:
        """Remove our unchanged wrappers and put back what `--force` moved aside.

        A wrapper edited since install is the operator's now and stays; if it had
        displaced a foreign file, that record stays in the manifest too, or the
        backup could never be restored: once the operator removes the edited file,
        the next uninstall puts the original back.
        """
        report = Report([])
        files = self._load()
        for rel, record in sorted(files.items()):
            if record.get("caller") not in callers:
                continue
            path = self.root / rel
            backup = self._backup_of(rel) if record.get("backup") else None
            if backup is not None and not _present(backup):
                backup = None  # removed by the operator: nothing left to restore
            present = _present(path)
            if present and not _is_wrapper_with(path, record.get("sha256")):
                report.kept += 1
                if backup is not None:
                    report.say(f"kept {path}: changed since nichooks installed it; {backup} stays "
                               f"recorded (remove {path} and uninstall again to restore it)")
                    continue  # the record stays with it
                report.say(f"kept {path}: changed since nichooks installed it")
                del files[rel]
                continue
            if present:
                report.say(f"{'would remove' if self.dry_run else 'removed'} {path}")
                if not self.dry_run:
                    path.unlink()
            if backup is not None:
                report.say(f"{'would restore' if self.dry_run else 'restored'} {path} from {backup}")
                if not self.dry_run:
                    os.replace(backup, path)
            if not self.dry_run:
                _remove_empty_parents(path.parent, self.root / "etc")
            del files[rel]
        self._save(files)
        return report


def _present(path: Path) -> bool:
    """Exists, counting a dangling symlink (which `Path.exists` does not)."""
    return os.path.lexists(path)


def _cannot_move_aside(path: Path, backup: Path) -> str | None:
    if _present(backup):
        return f"{backup} already exists"
    if path.is_dir() and not path.is_symlink():
        return "it is a directory"
    return None


def _is_wrapper_with(path: Path, sha256: str | None) -> bool:
    """A regular file with the recorded digest that is one of our wrappers: the
    digest alone comes from the manifest, which cannot be trusted to name only
    files we made."""
    if path.is_symlink() or not path.is_file() or sha256 is None:
        return False
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return data.startswith(WRAPPER_HEAD) and _digest(data) == sha256


def _write_file(path: Path, text: str, mode: int) -> None:
    """Write via a temporary file renamed into place, created 0600 and only then
    given `mode`: created with the umask's mode, a wrapper could be opened for
    writing by anyone before our chmod, and the open descriptor would outlive it."""
    tmp = path.with_name(path.name + ".nichooks-tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_empty_parents(directory: Path, stop: Path) -> None:
    """The per-mode directories install made: remove them again once empty."""
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def run(args: argparse.Namespace) -> int:
    """The CLI verbs `install` and `uninstall` (see nichooks.cli)."""
    ganeti, xen = args.ganeti, args.xen
    if not ganeti and not xen:
        ganeti = xen = True
    installer = Installer(Path(args.root), Path(sys.executable).parent, args.dry_run)
    if args.verb == "install":
        report = installer.install(installer.targets(ganeti, xen, args.xen_path), args.force)
    else:
        report = installer.uninstall({c for c, on in (("ganeti", ganeti), ("xen", xen)) if on})
    for line in report.lines:
        print(line)
    if report.kept:
        print(f"nichooks: {report.kept} file(s) kept as they were; see above", file=sys.stderr)
        return 1
    return 0
