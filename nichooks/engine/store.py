"""The state directory: journals, the tap -> key index, and atomic writes.

Files are replaced atomically (temp file, fsync, rename); a reader sees the old or
the new journal, never half of one, even on a full /run.

Layout under the state directory:
  nics/<key>.json   journals, nothing else
  taps/<tap>        the key of the journal that last claimed that tap name
  tmp/              temp files of writes in progress (an interrupted one is removed
                    by the next writer of the same key)
  corrupt/          journals that could not be parsed, moved aside for an operator
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nichooks.engine.journal import KEY, MAX_JOURNAL, CorruptJournal, Journal, check_key
from nichooks.errors import PlumbingError, UntrustedPath

DIR_MODE = 0o755
FILE_MODE = 0o644


class Store:
    """The state directory. Callers hold the NIC's lock (locks.py) around any write."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.nics = state_dir / "nics"
        self.taps = state_dir / "taps"
        self.tmp = state_dir / "tmp"
        self.corrupt = state_dir / "corrupt"
        self.locks = state_dir / "locks"

    def ensure(self) -> None:
        """Create what is missing (mode DIR_MODE whatever the umask), then check()."""
        from nichooks.trust import make_dirs

        for d in (self.root, self.nics, self.taps, self.tmp, self.locks):
            try:
                make_dirs(d, DIR_MODE)
            except NotADirectoryError:  # a file on the way
                raise PlumbingError(f"state directory {d} exists and is not a directory "
                                    "(NICHOOKS_STATE_DIR)") from None
            except OSError as exc:
                raise PlumbingError(f"cannot create state directory {d}: "
                                    f"{exc.strerror or exc}") from None
        self.check()

    def check(self) -> None:
        """Refuse a state directory someone other than root could write: the journals
        there decide what root undoes, the tap index whose plug a hook replaces.
        Missing directories are fine (nothing to trust yet)."""
        from nichooks.trust import untrusted_reason

        for d in (self.root, self.nics, self.taps, self.tmp, self.locks, self.corrupt,
                  self.root / "specs"):
            try:
                st = os.stat(d) if d == self.root else os.lstat(d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise PlumbingError(f"state directory {d}: {exc.strerror or exc}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise PlumbingError(f"state directory {d} exists and is not a directory; "
                                    "remove it (NICHOOKS_STATE_DIR)")
            reason = untrusted_reason(d, st)
            if reason:
                raise UntrustedPath(f"refusing the state directory: {reason}; "
                                    f"fix with: chown root:root {d} && chmod go-w {d}")

    # -- journals ---------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.nics / f"{check_key(key)}.json"

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def load(self, key: str) -> Journal | None:
        """The journal for `key`, None if there is none; CorruptJournal if unreadable."""
        from nichooks.safefile import read_regular

        try:
            text = read_regular(self.path(key), MAX_JOURNAL)
        except OSError as exc:
            raise CorruptJournal(f"{self.path(key)}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CorruptJournal(f"{self.path(key)} {exc}") from None
        if text is None:
            return None
        try:
            journal = Journal.from_json(json.loads(text))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptJournal(f"{self.path(key)}: {str(exc)[:200]}") from None
        if journal.key != key:
            raise CorruptJournal(f"{self.path(key)} holds key {journal.key}")
        return journal

    def save(self, journal: Journal) -> None:
        self._write_atomic(self.path(journal.key), _encode(journal))

    def delete(self, key: str) -> None:
        """Remove the journal and any temp file of it (an ifup killed while its scripts
        ran leaves its prepared `applied` journal in tmp/)."""
        path = self.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self._remove_stale(path.name)

    def forget(self, key: str, tap: str) -> None:
        """A NIC fully undone: its tap claim released first, its journal deleted last,
        so that a journal gone means the NIC is gone from the state directory (the
        agent, a sweep and the tests wait on that). A crash in between leaves a journal
        without a claim, which the next sweep or ifup finishes."""
        self.release_tap(tap, key)
        self.delete(key)

    def quarantine(self, key: str) -> Path:
        """Move an unreadable journal out of nics/ so that it no longer blocks the NIC,
        but is kept for an operator to read."""
        from nichooks.trust import make_dirs

        make_dirs(self.corrupt, DIR_MODE)
        dest = self.corrupt / f"{key}.json.{int(time.time())}"
        os.replace(self.path(key), dest)
        return dest

    def quarantined_keys(self) -> set[str]:
        """Keys of the journals moved to corrupt/ (named <key>.json.<time> by quarantine)."""
        try:
            names = os.listdir(self.corrupt)
        except OSError:
            return set()
        return {n.split(".", 1)[0] for n in names if KEY.fullmatch(n.split(".", 1)[0])}

    def journal_keys(self) -> list[str]:
        try:
            names = os.listdir(self.nics)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and KEY.fullmatch(n[:-5]))

    def journals(self) -> Iterator[tuple[str, Journal | None]]:
        """Every journal; None for one that cannot be read."""
        for key in self.journal_keys():
            try:
                yield key, self.load(key)
            except CorruptJournal:
                yield key, None

    # -- tap index --------------------------------------------------------
    def tap_owner(self, tap: str) -> str | None:
        from nichooks.safefile import read_regular

        try:
            raw = read_regular(self.taps / tap, 256)
            key = raw.decode().strip() if raw is not None else ""
        except (OSError, ValueError):  # not a file we wrote: no owner
            return None
        return key if KEY.fullmatch(key) else None

    def claim_tap(self, tap: str, key: str) -> None:
        self._write_atomic(self.taps / tap, key.encode())

    def release_tap(self, tap: str, key: str) -> None:
        """Drop the index entry only if it still names `key`: a newer plug may have
        claimed the tap name since."""
        if self.tap_owner(tap) == key:
            try:
                (self.taps / tap).unlink()
            except FileNotFoundError:
                pass
            self._remove_stale(tap)

    # -- atomic writes ----------------------------------------------------
    def _write_atomic(self, dest: Path, data: bytes) -> None:
        """Replace `dest` with `data`, or leave it as it was and raise JournalWriteError.

        On a full /run a short write must never replace a good journal with the
        first part of one: every byte is written and fsynced before the rename, and
        a temp file that could not be completed is removed."""
        tmp = self._prepare(dest, data)
        self._commit(tmp, dest)

    def _prepare(self, dest: Path, data: bytes) -> Path:
        """The complete, fsynced temp file that will become `dest`."""
        self._remove_stale(dest.name)
        tmp = self.tmp / f"{dest.name}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise JournalWriteError(dest, exc) from None
        try:
            os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:  # never for a regular file, but a loop must not spin
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(tmp)
            raise JournalWriteError(dest, exc) from None
        os.close(fd)
        return tmp

    def _commit(self, tmp: Path, dest: Path) -> None:
        """Rename the prepared temp file over `dest`. A rename needs no data blocks, so
        a disk that filled up since the temp file was written does not stop it."""
        try:
            os.replace(tmp, dest)
        except IsADirectoryError:
            _unlink_quietly(tmp)
            raise PlumbingError(f"{dest} is a directory nichooks did not make; remove it") from None
        except OSError as exc:
            _unlink_quietly(tmp)
            raise JournalWriteError(dest, exc) from None
        try:
            dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:  # renamed, but not known to be durable: say so
            raise JournalWriteError(dest, exc) from None

    def prepare_save(self, journal: Journal) -> PreparedSave:
        """Write `journal` to a temp file now and rename it into place later
        (PreparedSave.commit): ifup's final `applied` state is written before the
        custom scripts run, so that whatever they do to the disk, recording success
        afterwards is only a rename."""
        dest = self.path(journal.key)
        return PreparedSave(self, self._prepare(dest, _encode(journal)), dest)

    def _remove_stale(self, stem: str) -> None:
        """Temp files left by an interrupted write of this same file, and only those:
        the name is matched literally (a tap named `*` or `tap0` must not match
        `tap0.100`'s temp files), followed by a pid and `.tmp`."""
        own = re.compile(re.escape(stem) + r"\.[0-9]+\.tmp")
        try:
            names = os.listdir(self.tmp)
        except OSError:
            return
        for name in names:
            if own.fullmatch(name):
                # The caller holds this file's lock, so no live writer owns these.
                _unlink_quietly(self.tmp / name)


@dataclass
class PreparedSave:
    store: Store
    tmp: Path
    dest: Path

    def commit(self) -> None:
        self.store._commit(self.tmp, self.dest)

    def discard(self) -> None:
        _unlink_quietly(self.tmp)


class JournalWriteError(PlumbingError):
    """A journal or tap index file could not be written completely; the file on disk
    is the one from before (never a truncated one)."""

    def __init__(self, dest: Path, exc: OSError) -> None:
        super().__init__(f"cannot write {dest}: {exc.strerror or exc}", step="journal")


def _encode(journal: Journal) -> bytes:
    return json.dumps(journal.to_json(), indent=1, sort_keys=True).encode()


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
