"""Which files and directories root may act on: owned by root (or by the user running
nichooks, for a developer's unprivileged run) and writable by nobody else.

Whoever can write the state directory's nics/ decides what the root agent undoes,
whoever can write nichooks.conf decides our settings, whoever can write a script
directory runs code as root. A path that fails this check is refused, never used.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def trusted_uids() -> tuple[int, ...]:
    return (0,) if os.geteuid() == 0 else (0, os.geteuid())


def untrusted_reason(path: object, st: os.stat_result) -> str | None:
    """Why `path` (described by `st`) must not be trusted, or None."""
    if st.st_uid not in trusted_uids():
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def make_dirs(directory: Path, mode: int) -> None:
    """Create `directory` and any missing parents as `mode`, whatever the umask: under
    umask 000 `mkdir -p` makes directories anyone can write into, under 077 ones that
    unprivileged tools cannot read. The mode given to mkdir is never wider than the
    final one, so there is no window either. A directory someone else made meanwhile
    is left as it is (and judged by untrusted_reason where it matters)."""
    missing: list[Path] = []
    while not os.path.lexists(directory):  # a dangling symlink is there: mkdir would fail
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        os.chmod(d, mode)
