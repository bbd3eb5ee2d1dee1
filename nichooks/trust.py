"""Which files and directories root may act on: owned by root (or by the user running
nichooks, for a developer's unprivileged run) and writable by nobody else.

Whoever can write the state directory's nics/ decides what the root agent undoes,
whoever can write nichooks.conf decides our settings, whoever can write a script
directory runs code as root. A path that fails this check is refused, never used.
"""

from __future__ import annotations

import os
import stat


def trusted_uids() -> tuple[int, ...]:
    return (0,) if os.geteuid() == 0 else (0, os.geteuid())


def untrusted_reason(path: object, st: os.stat_result) -> str | None:
    """Why `path` (described by `st`) must not be trusted, or None."""
    if st.st_uid not in trusted_uids():
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
