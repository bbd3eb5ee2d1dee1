"""`nichooks install` / `nichooks uninstall`: put our entry points exactly where each
caller looks (contract §8), and take away only what we put there.

Each installed file is a small wrapper that execs our entry point by absolute path
(Ganeti's PATH lacks our virtualenv, and a PATH lookup of `kvm-ifup` could find
Ganeti's own script, which execs `kvm-vif-bridge` again: a loop). The wrapper also
refuses to run inside itself, so no chain of stock and custom scripts can loop.

What was made is recorded in `<root>/var/lib/nichooks/installed.json` (not /run: it
must survive a reboot, or uninstall would forget what is ours). A file we did not
make is never overwritten: it is kept and reported, unless `--force`, which moves it
to `<path>.nichooks-backup` first; uninstall puts such backups back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

MANIFEST = Path("var/lib/nichooks/installed.json")
BACKUP_SUFFIX = ".nichooks-backup"
MODES = ("bridged", "openvswitch", "routed")

# (caller, path under root, our entry point)
GANETI_TARGETS = [
    ("ganeti", "etc/ganeti/kvm-vif-bridge", "kvm-ifup"),     # stock 2.x-3.1: exec'd, env only
    ("ganeti", "etc/ganeti/kvm-ifup-custom", "kvm-ifup"),    # the ifdown patch (GRNET)
    ("ganeti", "etc/ganeti/kvm-ifdown-custom", "kvm-ifdown"),
] + [("ganeti", f"etc/ganeti/network/{mode}/{action}", entry)   # 3.2's per-mode layout
     for mode in MODES for action, entry in (("up", "kvm-ifup"), ("down", "kvm-ifdown"))]
XEN_DEFAULT = "etc/xen/scripts/vif-custom"                      # exec'd by stock vif-ganeti


def wrapper(entry: Path, installed_as: str) -> str:
    return f"""#!/bin/sh
# Installed by `nichooks install`; `nichooks uninstall` removes it. Do not edit:
# a changed file is no longer ours and uninstall will leave it.
if [ -n "${{NICHOOKS_WRAPPED:-}}" ]; then
    echo "nichooks: {installed_as} was called again from within $NICHOOKS_WRAPPED: refusing to loop" >&2
    exit 1
fi
NICHOOKS_WRAPPED={installed_as}
export NICHOOKS_WRAPPED
exec {entry} "$@"
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
        self.root = root
        self.bin_dir = bin_dir
        self.dry_run = dry_run
        self.manifest_path = root / MANIFEST

    def _load(self) -> dict[str, dict[str, str | None]]:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): dict(v) for k, v in data.get("files", {}).items()}

    def _save(self, files: dict[str, dict[str, str | None]]) -> None:
        if self.dry_run:
            return
        self.manifest_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.manifest_path)

    def targets(self, ganeti: bool, xen: bool, xen_path: str | None) -> list[tuple[str, str, str]]:
        out = list(GANETI_TARGETS) if ganeti else []
        if xen:
            out.append(("xen", (xen_path or "/" + XEN_DEFAULT).lstrip("/"), "vif-ganeti"))
        return out

    def install(self, targets: list[tuple[str, str, str]], force: bool) -> Report:
        report = Report([])
        files = self._load()
        for caller, rel, entry_name in targets:
            path = self.root / rel
            entry = self.bin_dir / entry_name
            if path.resolve() == entry.resolve():
                report.say(f"skipped {path}: it is our own entry point")
                continue
            text = wrapper(entry, "/" + rel)
            record = files.get(rel)
            exists = path.exists() or path.is_symlink()
            ours = record is not None and exists and _is_file_with(path, record.get("sha256"))
            backup = record.get("backup") if record else None
            if exists and not ours:
                if not force:
                    report.say(f"kept {path}: not made by nichooks; left to the operator "
                               "(--force moves it aside and installs ours)")
                    report.kept += 1
                    continue
                backup = str(path) + BACKUP_SUFFIX
                report.say(f"moved {path} to {backup}")
                if not self.dry_run:
                    os.replace(path, backup)
            report.say(f"{'would install' if self.dry_run else 'installed'} {path} -> {entry}")
            if not self.dry_run:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".nichooks-tmp")
                tmp.write_text(text)
                os.chmod(tmp, 0o755)
                os.replace(tmp, path)
            files[rel] = {"caller": caller, "entry": str(entry), "sha256": _digest(text),
                          "backup": backup}
        self._save(files)
        return report

    def uninstall(self, callers: set[str]) -> Report:
        report = Report([])
        files = self._load()
        for rel, record in sorted(files.items()):
            if record.get("caller") not in callers:
                continue
            path = self.root / rel
            if (path.exists() or path.is_symlink()) and not _is_file_with(path, record.get("sha256")):
                report.say(f"kept {path}: changed since nichooks installed it")
                report.kept += 1
            elif path.exists():
                report.say(f"{'would remove' if self.dry_run else 'removed'} {path}")
                if not self.dry_run:
                    path.unlink()
            backup = record.get("backup")
            if backup and Path(backup).exists() and not path.exists():
                report.say(f"restored {path} from {backup}")
                if not self.dry_run:
                    os.replace(backup, path)
            if not self.dry_run:
                _remove_empty_parents(path.parent, self.root / "etc")
            del files[rel]
        self._save(files)
        return report


def _is_file_with(path: Path, sha256: str | None) -> bool:
    if path.is_symlink() or not path.is_file() or sha256 is None:
        return False
    try:
        return _digest(path.read_bytes()) == sha256
    except OSError:
        return False


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
