"""Locks: one file lock per NIC key and per tap name, taken in sorted order.

A hook may need several locks (its own NIC, its tap name, and the NIC that last
claimed that tap name). Taking them always in one global order rules out deadlock
between hooks; the timeout turns a stuck holder into one clear error.

Lock files of NICs that are gone are deleted by their last holder (lock_nic).
That relies on filelock (4.0 and later) re-opening the path when the file it got
the lock on has been unlinked meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from nichooks.engine.journal import CorruptJournal
from nichooks.engine.store import Store
from nichooks.errors import LockTimeout, PlumbingError

BUSY_TIMEOUT = 2.0  # a sweep skips a NIC a hook holds for longer; the next sweep gets it


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


def _journal_tap(store: Store, key: str) -> str | None:
    try:
        journal = store.load(key)
    except CorruptJournal:
        return None
    return journal.tap if journal else None


def _lock_set(store: Store, key: str | None, tap: str | None) -> list[str]:
    """Every lock a call on (key, tap) needs: the NIC, its tap, the tap its journal
    names (hot-modify moved it), and the NIC that last claimed the tap name."""
    keys, taps = set(), set()
    if key:
        keys.add(key)
        old_tap = _journal_tap(store, key)
        if old_tap:
            taps.add(old_tap)
    if tap:
        taps.add(tap)
        owner = store.tap_owner(tap)
        if owner:
            keys.add(owner)
    return lock_names(keys, taps)


def _remove_unused_locks(store: Store, names: list[str]) -> None:
    """Delete the lock files of a NIC whose journal is gone and of a tap no journal
    claims, so that a host that has run thousands of guests does not keep thousands
    of lock files. Safe only while we hold them: a waiter that then gets the lock on
    the unlinked file sees it has no name any more and opens the path again
    (filelock's st_nlink check), so no two callers ever hold one name at once."""
    for name in names:
        kind, _sep, what = name.partition("-")
        unused = not store.exists(what) if kind == "nic" else store.tap_owner(what) is None
        if unused:
            try:
                (store.locks / f"{name}.lock").unlink()
            except OSError:
                pass


def lock_nic(stack: ExitStack, store: Store, key: str | None, tap: str | None,
             timeout: float, label: str) -> None:
    """Take the lock set, re-checking it did not change while we waited."""
    for _ in range(8):
        names = _lock_set(store, key, tap)
        inner = ExitStack()
        acquire(inner, store.locks, names, timeout, label)
        if _lock_set(store, key, tap) == names:
            # Runs first on exit, while every lock is still held.
            inner.callback(_remove_unused_locks, store, names)
            stack.push(inner)
            return
        inner.close()
    raise PlumbingError("the NIC's journal kept changing while waiting for its locks",
                        nic=label, step="lock")


@contextmanager
def locked(store: Store, key: str, timeout: float) -> Iterator[None]:
    """Hold one NIC's lock set (for work on its journal after its hook has gone)."""
    with ExitStack() as stack:
        lock_nic(stack, store, key, None, timeout, key)
        yield
