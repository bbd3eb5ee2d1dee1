"""Reading Ganeti's KVM run directory, whose every file is untrusted input.

Hooks run as root over a directory that Ganeti, an administrator or a compromised
instance's leftovers may fill with anything: symlinks out of the directory, FIFOs
that would block a read, oversized or undecodable files, names that are not
interface names. A hook must not hang, follow a link elsewhere or die on any of
them, so every reader here answers "nothing" instead of raising or logging, and
leaves the deciding (and the saying) to ganeti_runtime.py.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: a hook pays for every import
    from pathlib import Path

MAX_TAP_FILE = 256
"""A tap name is at most 15 bytes; anything much longer is not a tap file."""

_SEQ_RE = re.compile(r"(?:0|[1-9][0-9]{0,5})\Z")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_IFNAMSIZ = 16


@dataclass(frozen=True)
class TapFile:
    """One file of ``nic/<instance>/``: a ``<seq>`` file (``seq`` set) or a
    ``<nic-uuid>`` file (``uuid`` set)."""

    name: str
    tap: str
    mtime_ns: int
    seq: int | None
    uuid: str | None

    @property
    def order(self) -> tuple[int, int]:
        """Write order; files written in the same clock tick (a start writes all
        of them at once) are in seq order because Ganeti writes them so."""
        return (self.mtime_ns, -1 if self.seq is None else self.seq)


def scan(run_dir: Path) -> list[tuple[str, list[TapFile]]]:
    """Every instance directory under ``nic/`` with its readable tap files."""
    root = run_dir / "kvm-hypervisor" / "nic"
    try:
        with os.scandir(root) as entries:
            names = [e.name for e in entries if _valid_instance(e.name)]
    except OSError:
        return []
    result = []
    for instance in sorted(names):
        files = _instance_files(root / instance)
        if files:
            result.append((instance, files))
    return result


def _instance_files(directory: Path) -> list[TapFile]:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []  # gone, unreadable, or a symlink that could lead anywhere
    try:
        with os.scandir(dir_fd) as entries:
            names = [e.name for e in entries]
        files = []
        for name in names:
            seq = int(name) if _SEQ_RE.match(name) else None
            uuid = name if _UUID_RE.match(name) else None
            if seq is None and uuid is None:
                continue
            content = _read_at(dir_fd, directory, name, MAX_TAP_FILE)
            if content is None:
                continue
            data, mtime_ns = content
            tap = os.fsdecode(data[:-1] if data.endswith(b"\n") else data)
            if valid_ifname(tap):
                files.append(TapFile(name, tap, mtime_ns, seq, uuid))
        return files
    except OSError:
        return []
    finally:
        os.close(dir_fd)


def read_file(directory: Path, name: str, limit: int) -> tuple[bytes, int] | None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_at(dir_fd, directory, name, limit, follow_sibling=False)
    finally:
        os.close(dir_fd)


def _read_at(
    dir_fd: int, directory: Path, name: str, limit: int, follow_sibling: bool = True
) -> tuple[bytes, int] | None:
    """Content and mtime of regular file ``name`` in ``dir_fd``, or None.

    Symlinks are not followed, except (``follow_sibling``) one that points at a
    file of the same directory: the ifdown design keeps ``<seq>`` as a symlink
    to ``<nic-uuid>``. Non-blocking so that a FIFO planted there cannot hang us.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as err:
        if err.errno != errno.ELOOP or not follow_sibling:
            return None
        sibling = _sibling_target(dir_fd, directory, name)
        if sibling is None:
            return None
        try:
            fd = os.open(sibling, flags, dir_fd=dir_fd)
        except OSError:
            return None
    from nichooks.safefile import read_fd

    try:
        return read_fd(fd, limit), os.fstat(fd).st_mtime_ns
    except (OSError, ValueError):  # ValueError: NotReadable
        return None
    finally:
        os.close(fd)


def _sibling_target(dir_fd: int, directory: Path, name: str) -> str | None:
    """The file name a symlink points to, if it stays in ``directory``."""
    try:
        target = os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None
    parent, base = os.path.split(target)
    if not base or base in (".", "..") or not _valid_instance(base):
        return None
    if parent and os.path.realpath(directory / parent) != os.path.realpath(directory):
        return None
    return base



def qemu_running(run_dir: Path, instance: str) -> bool:
    """Whether the process in Ganeti's pid file for the instance exists."""
    data = read_file(run_dir / "kvm-hypervisor" / "pid", instance, 64)
    if data is None:
        return False
    text = data[0].strip()
    if not text.isdigit() or len(text) > 10:
        return False
    return os.path.exists(f"/proc/{int(text)}")


def _valid_instance(name: str) -> bool:
    """A directory entry usable as an instance name: one path component that
    cannot lead elsewhere, and text an environment variable can carry."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in the name
        return False
    return True


def valid_ifname(name: str) -> bool:
    """The kernel's rule for interface names (``dev_valid_name``)."""
    if not name or name in (".", ".."):
        return False
    try:
        if len(os.fsencode(name)) >= _IFNAMSIZ:
            return False
    except UnicodeEncodeError:
        return False
    return not any(c == "/" or c == ":" or c.isspace() for c in name)
