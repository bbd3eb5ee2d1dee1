"""Kernel objects whose close makes the caller wait, left for the process's exit when
that exit comes right after the call is answered (the agent's process for a served
hook): the caller then does not wait for them.

- A packet socket is closed only after an RCU grace period (synchronize_net: 5-10 ms
  here).
- An nfnetlink socket's close (libnftables' context) waits for the kernel to free the
  objects of every recent nftables commit on the host, which takes a grace period too
  (10-30 ms here), right after a plug or unplug changed the ruleset.
"""

from __future__ import annotations

from collections.abc import Callable

_DEFERRED: list[object] | None = None  # what the exit will close, once defer_closes() ran


def defer_closes() -> None:
    """From now on, release() keeps what it is given for this process's exit to close."""
    global _DEFERRED
    _DEFERRED = []


def release(thing: object, close: Callable[[], None]) -> None:
    """Close `thing` now, or keep a reference to it for the exit (see defer_closes)."""
    if _DEFERRED is None:
        close()
    else:
        _DEFERRED.append(thing)
