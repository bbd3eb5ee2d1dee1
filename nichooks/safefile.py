"""Reading small files that anyone could have replaced with something else.

A journal, a tap index entry or an rt_tables file is read by a hook a hypervisor
waits for: a FIFO in its place must not hang it, a symlink to /dev/zero must not read
forever, a directory must not become a traceback. Open non-blocking, check with fstat
that it is a regular file, read at most `limit` bytes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class NotReadable(ValueError):
    """The path exists but is not a regular file of acceptable size."""


def read_regular(path: Path, limit: int) -> bytes | None:
    """The file's bytes; None if it does not exist. NotReadable if it is not a regular
    file or is larger than `limit`; OSError for what the kernel refuses (ELOOP, EACCES)."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return read_fd(fd, limit)
    finally:
        os.close(fd)


OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def read_fd(fd: int, limit: int) -> bytes:
    """What an open descriptor holds, if it is a regular file of at most `limit` bytes
    (NotReadable otherwise; the caller closes it)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise NotReadable("is not a regular file")
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = os.read(fd, limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise NotReadable(f"is larger than {limit} bytes")
    return b"".join(chunks)
