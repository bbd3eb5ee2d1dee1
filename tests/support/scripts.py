"""Custom scripts (ifup.d, ifdown.d) as an administrator installs them."""

from __future__ import annotations

from pathlib import Path


def write_script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    """`directory`/`name`, a /bin/sh script running `body`, with `mode`; `directory`
    (and its parents) made first if missing, 0755 whatever the umask, as root's own
    directories are (a group- or world-writable one would be refused)."""
    if not directory.is_dir():
        directory.mkdir(parents=True)
        directory.chmod(0o755)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path
