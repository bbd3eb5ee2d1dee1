"""Locks: one file lock per NIC key and per tap name, taken in sorted order.

A hook may need several locks (its own NIC, its tap name, and the NIC that last
claimed that tap name). Taking them always in one global order rules out deadlock
between hooks; the timeout turns a stuck holder into one clear error.

Lock files of NICs that are gone are deleted by their last holder (hooks.lock_nic).
That relies on filelock (4.0 and later) re-opening the path when the file it got
the lock on has been unlinked meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from nichooks.errors import LockTimeout


def lock_names(keys: Iterable[str], taps: Iterable[str]) -> list[str]:
    return sorted({f"nic-{k}" for k in keys} | {f"tap-{t}" for t in taps})


def acquire(stack: ExitStack, locks_dir: Path, names: list[str], timeout: float,
            what: str) -> None:
    """Take every lock in `names` (already sorted) or raise LockTimeout; the ExitStack
    releases them."""
    from filelock import FileLock, Timeout

    for name in names:
        lock = FileLock(str(locks_dir / f"{name}.lock"), timeout=timeout, mode=0o644)
        try:
            lock.acquire()
        except Timeout:
            raise LockTimeout(
                f"another nichooks call has held {name} for more than {timeout:g}s "
                f"(lock file {locks_dir / (name + '.lock')}); nothing was changed",
                nic=what) from None
        stack.callback(lock.release)
