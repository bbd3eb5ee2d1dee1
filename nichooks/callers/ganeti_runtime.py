"""Ganeti's KVM runtime files: which NIC a tap belongs to, when nobody says.

Released Ganeti never calls an ifdown, and QEMU's ``downscript``, a
sweep or an administrator name only a tap. To find out what that tap was, we read
what Ganeti's KVM hypervisor leaves under ``$GANETI_RUN_DIR/kvm-hypervisor/``:

* ``nic/<instance>/<seq>``: the tap name, no newline, written after QEMU started
  (all NICs, in runtime order) and after each NIC hot-add or hot-modify;
* ``conf/<instance>.runtime``: JSON ``[kvm_cmd, nics, hvparams, disks]`` (three
  items before Ganeti 2.16), ``nics`` being ``objects.NIC.ToDict()`` dicts.

The two are joined by position, and positions drift: a
hot-remove deletes file ``<config index>`` and the NIC's runtime entry, but later
files keep their numbers, so from then on config indices and file numbers
disagree and the next hot-remove deletes *another* NIC's file; a hot-modify
rewrites the file under the NIC's config index but moves its runtime entry to
the end; a hot-add writes ``<number of NICs>``, possibly over a running NIC's
file; a soft reboot or a migration rewrites ``0..n-1`` in runtime order. Taking
``nics[seq]`` is wrong after any of these, and a wrong answer is worse than none:
it names another NIC, whose plumbing an ifdown would then tear down. So:

1. a file named after a NIC UUID (written by the GRNET ifdown patches and in
   Ganeti's ifdown design, possibly as the target of a ``<seq>`` symlink) names
   the runtime NIC with that UUID: the one sound answer;
2. while the tap exists (the instance runs), the *write order* of the ``<seq>``
   files, after setting aside those that cannot be current: one naming a tap
   that a newer file also names (the kernel reuses tap names), or a tap that no
   longer exists (its NIC was removed or re-plugged). Every write of a
   ``<seq>`` file appends a NIC to the runtime list (a start writes them all,
   in order) and a hot-remove deletes an entry, so when as many current files
   as runtime NICs remain, the k-th file by modification time belongs to the
   k-th runtime NIC - also after hot-removes and hot-modifies, where
   ``nics[seq]`` is wrong. Files older than a complete ``0..n-1`` batch (left
   over from before a soft reboot) are set aside too;
3. a tap that is gone while the instance still runs (another of its taps
   exists, or the QEMU of its pid file) was removed or re-plugged: its file is
   stale, the answer is None;
4. once everything is gone (shut down, crashed), stale files can no longer be
   told by their taps, so only the layout a start leaves (files ``0..n-1``
   written in that order) is trusted.

Anything else - counts that do not add up, tied claims - gives None. This is
the best the files allow, not a proof: after several drifting hot-removes, or a
soft reboot or migration following a hot-modify, a file of a removed NIC can
pair up with a NIC whose file Ganeti deleted by mistake, and the counts still
agree. Replaying every sequence of up to five hot-adds, -removes, -modifies,
soft and hard reboots and non-hotplug NIC changes on one to four NICs: while the
instance runs, about one answer in 20 000 names the wrong NIC, against nearly
one in two for ``nics[seq]``; after a shutdown, one in 600; in both cases none
when, since the last full start, there was no soft reboot or non-hotplug NIC
change and at most one hot-remove took a NIC other than the last. Callers
should prefer their own journal, which knows.

Every file is untrusted input: unreadable, oversized or malformed files, and
names that could leave the run directory, mean "no answer", never an exception
and never a log line (the caller decides what to say). Reading them so is
ganeti_run_dir.py's job, and rebuilding a NIC's variables from Ganeti's JSON
ganeti_nic_env.py's; this module only decides which NIC a tap is.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from nichooks.callers.ganeti_nic_env import Garbage, hook_env, load_runtime_nics
from nichooks.callers.ganeti_run_dir import TapFile, qemu_running, scan, valid_ifname

if TYPE_CHECKING:  # annotations only: a hook pays for every import
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any


def find_tap(run_dir: Path, tap: str) -> list[tuple[str, int]]:
    """Every ``(instance, seq)`` whose ``nic/<instance>/<seq>`` file names ``tap``.

    More than one answer means stale files (tap names are reused by the kernel);
    :func:`nic_env_for_tap` decides between them.
    """
    if not valid_ifname(tap):
        return []
    found: list[tuple[str, int]] = []
    for instance, files in scan(run_dir):
        found.extend((instance, f.seq) for f in files if f.tap == tap and f.seq is not None)
    return sorted(found)


def nic_env_for_tap(
    run_dir: Path, tap: str, *, link_exists: Callable[[str], bool] | None = None
) -> dict[str, str] | None:
    """The environment Ganeti passed to ``kvm-ifup`` for the NIC on ``tap``.

    Keys as Ganeti exports them: INSTANCE MAC MODE INTERFACE INTERFACE_INDEX
    INTERFACE_UUID, and IP INTERFACE_NAME LINK VLAN BRIDGE NETWORK_* where Ganeti
    sets them. Not TAGS (the instance's tags are not in the runtime file) nor
    PATH. INTERFACE_INDEX is the ``<seq>`` Ganeti used for the plug; it is left
    out when only a UUID-named file names the tap. None when no runtime NIC can
    be matched to the tap with confidence, or the files are unreadable/garbage.

    ``link_exists`` tells whether a network device exists (default: look in
    ``/sys/class/net`` of our own namespace); tests replace it.
    """
    if not valid_ifname(tap):
        return None
    exists = _link_exists if link_exists is None else link_exists
    scanned = scan(run_dir)
    newest_claim: dict[str, int] = {}  # tap -> newest mtime of a file naming it
    for _, files in scanned:
        for f in files:
            newest_claim[f.tap] = max(f.mtime_ns, newest_claim.get(f.tap, f.mtime_ns))
    # Several instances naming one tap: all but one are leftovers (a crashed
    # instance's directory). The live one wrote its file after its tap was
    # created, hence after any earlier holder of the name was gone.
    claims = [(i, files) for i, files in scanned if any(f.tap == tap for f in files)]
    latest = newest_claim.get(tap)
    winners = [(i, fs) for i, fs in claims if any(f.mtime_ns == latest for f in fs if f.tap == tap)]
    if len(winners) != 1:
        return None
    instance, files = winners[0]
    try:
        nics = load_runtime_nics(run_dir, instance)
        if nics is None:
            return None
        match = _match(run_dir, instance, tap, _current(instance, files, scanned), nics, exists)
        if match is None:
            return None
        nic, seq = match
        return hook_env(instance, tap, seq, nic)
    except Garbage:
        return None


def _current(
    instance: str, files: list[TapFile], scanned: list[tuple[str, list[TapFile]]]
) -> list[TapFile]:
    """The instance's files that no newer file replaced: a newer one naming the
    same tap, of the same kind (``<seq>`` or ``<uuid>``) or of another instance,
    means the kernel gave that name to a later device. (A ``<uuid>`` file written
    just after its ``<seq>`` twin, by the GRNET patches, replaces nothing.)"""
    same_kind: dict[tuple[str, bool], int] = {}
    elsewhere: dict[str, int] = {}
    for owner, owned in scanned:
        for f in owned:
            key = (f.tap, f.seq is not None)
            same_kind[key] = max(f.mtime_ns, same_kind.get(key, f.mtime_ns))
            if owner != instance:
                elsewhere[f.tap] = max(f.mtime_ns, elsewhere.get(f.tap, f.mtime_ns))
    return [
        f
        for f in files
        if f.mtime_ns >= same_kind[(f.tap, f.seq is not None)] and f.mtime_ns >= elsewhere.get(f.tap, 0)
    ]


def _match(
    run_dir: Path,
    instance: str,
    tap: str,
    files: list[TapFile],
    nics: list[dict[str, Any]],
    exists: Callable[[str], bool],
) -> tuple[dict[str, Any], int | None] | None:
    """The runtime NIC ``tap`` belongs to, and the seq it was plugged with,
    from the instance's current (not superseded) files."""
    hits = [f for f in files if f.tap == tap]
    seq_hits = sorted((f for f in hits if f.seq is not None), key=lambda f: f.order)
    plug = seq_hits[-1] if seq_hits else None
    plug_seq = None if plug is None else plug.seq

    by_uuid = {n["uuid"]: n for n in nics if isinstance(n.get("uuid"), str)}
    for f in sorted(hits, key=lambda f: f.order, reverse=True):
        if f.uuid is not None and f.uuid in by_uuid:
            return by_uuid[f.uuid], plug_seq

    if plug is None or not nics:
        return None
    seq_files = [f for f in files if f.seq is not None]
    count = len(nics)
    if exists(tap):
        # The instance runs: a file naming a vanished tap is stale.
        seq_files = [f for f in seq_files if f.tap == tap or exists(f.tap)]
    elif any(exists(f.tap) for f in files) or qemu_running(run_dir, instance):
        return None  # our tap vanished while the instance runs: removed or re-plugged
    else:
        # All gone (shut down, crashed): stale files can no longer be told by
        # their taps, so only the layout a start leaves is trusted.
        ordered = sorted(seq_files, key=lambda f: f.order)
        if [f.seq for f in ordered] != list(range(count)):
            return None
        return nics[ordered.index(plug)], plug_seq
    ordered = sorted(seq_files, key=lambda f: f.order)
    if len(ordered) > count:
        kept, stale = ordered[-count:], ordered[:-count]
        fresh_batch = [f.seq for f in kept] == list(range(count))
        if not fresh_batch or stale[-1].mtime_ns >= kept[0].mtime_ns:
            return None
        ordered = kept
    if len(ordered) != count or plug not in ordered:
        return None
    return nics[ordered.index(plug)], plug_seq



def _link_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/sys/class/net", name))
