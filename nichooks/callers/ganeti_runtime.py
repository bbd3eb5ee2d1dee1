"""Ganeti's KVM runtime files: which NIC a tap belongs to, when nobody says.

Released Ganeti never calls an ifdown (contract §1), and QEMU's ``downscript``, a
sweep or an administrator name only a tap. To find out what that tap was, we read
what Ganeti's KVM hypervisor leaves under ``$GANETI_RUN_DIR/kvm-hypervisor/``
(contract §5.3):

* ``nic/<instance>/<seq>``: the tap name, no newline, written after QEMU started
  (all NICs, in runtime order) and after each NIC hot-add or hot-modify;
* ``conf/<instance>.runtime``: JSON ``[kvm_cmd, nics, hvparams, disks]`` (three
  items before Ganeti 2.16), ``nics`` being ``objects.NIC.ToDict()`` dicts.

The two are joined by position, and positions drift (contract §5.3): a
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
and never a log line (the caller decides what to say).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: a hook pays for every import
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

MAX_TAP_FILE = 256
"""A tap name is at most 15 bytes; anything much longer is not a tap file."""

MAX_RUNTIME_FILE = 16 * 1024 * 1024
"""Runtime files hold a QEMU command line and a few dicts per device: kilobytes."""

_SEQ_RE = re.compile(r"(?:0|[1-9][0-9]{0,5})\Z")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_IFNAMSIZ = 16


class _Garbage(Exception):
    """A runtime file that is not what Ganeti writes; turned into None."""


@dataclass(frozen=True)
class _TapFile:
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


def find_tap(run_dir: Path, tap: str) -> list[tuple[str, int]]:
    """Every ``(instance, seq)`` whose ``nic/<instance>/<seq>`` file names ``tap``.

    More than one answer means stale files (tap names are reused by the kernel);
    :func:`nic_env_for_tap` decides between them.
    """
    if not _valid_ifname(tap):
        return []
    found: list[tuple[str, int]] = []
    for instance, files in _scan(run_dir):
        found.extend((instance, f.seq) for f in files if f.tap == tap and f.seq is not None)
    return sorted(found)


def nic_env_for_tap(
    run_dir: Path, tap: str, *, link_exists: Callable[[str], bool] | None = None
) -> dict[str, str] | None:
    """The environment Ganeti passed to ``kvm-ifup`` for the NIC on ``tap``.

    Keys as in contract §3: INSTANCE MAC MODE INTERFACE INTERFACE_INDEX
    INTERFACE_UUID, and IP INTERFACE_NAME LINK VLAN BRIDGE NETWORK_* where Ganeti
    sets them. Not TAGS (the instance's tags are not in the runtime file) nor
    PATH. INTERFACE_INDEX is the ``<seq>`` Ganeti used for the plug; it is left
    out when only a UUID-named file names the tap. None when no runtime NIC can
    be matched to the tap with confidence, or the files are unreadable/garbage.

    ``link_exists`` tells whether a network device exists (default: look in
    ``/sys/class/net`` of our own namespace); tests replace it.
    """
    if not _valid_ifname(tap):
        return None
    exists = _link_exists if link_exists is None else link_exists
    scanned = _scan(run_dir)
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
        nics = _load_runtime_nics(run_dir, instance)
        if nics is None:
            return None
        match = _match(run_dir, instance, tap, _current(instance, files, scanned), nics, exists)
        if match is None:
            return None
        nic, seq = match
        return _hook_env(instance, tap, seq, nic)
    except _Garbage:
        return None


def _current(
    instance: str, files: list[_TapFile], scanned: list[tuple[str, list[_TapFile]]]
) -> list[_TapFile]:
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
    files: list[_TapFile],
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
    elif any(exists(f.tap) for f in files) or _qemu_running(run_dir, instance):
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


def _hook_env(instance: str, tap: str, seq: int | None, nic: dict[str, Any]) -> dict[str, str]:
    """Rebuild ``hv_base.ConfigureNIC``'s environment from one runtime NIC dict."""
    params = nic.get("nicparams")
    if not isinstance(params, dict):
        raise _Garbage
    mac = _required_str(nic, "mac")
    uuid = _required_str(nic, "uuid")
    mode = _required_str(params, "mode")
    env = {"INSTANCE": instance, "MAC": mac, "MODE": mode, "INTERFACE": tap}
    if seq is not None:
        env["INTERFACE_INDEX"] = str(seq)
    env["INTERFACE_UUID"] = uuid
    ip = _optional_str(nic, "ip")
    if ip:
        env["IP"] = ip
    name = _optional_str(nic, "name")
    if name:
        env["INTERFACE_NAME"] = name
    link = _optional_str(params, "link") or ""
    if link:
        env["LINK"] = link
    vlan = _optional_str(params, "vlan")
    if vlan is not None:  # Ganeti exports it whenever the key exists, even empty
        env["VLAN"] = vlan
    if _optional_str(nic, "network"):
        env.update(_network_env(nic.get("netinfo")))
    if mode == "bridged":
        env["BRIDGE"] = link
    return env


def _network_env(netinfo: object) -> dict[str, str]:
    """``objects.Network.HooksDict()`` from the network dict Ganeti embeds."""
    if netinfo is None:
        return {}
    if not isinstance(netinfo, dict):
        raise _Garbage
    env = {}
    for key, field in (("NETWORK_NAME", "name"), ("NETWORK_UUID", "uuid")):
        value = _optional_str(netinfo, field)
        if value is not None:
            env[key] = value
    tags = netinfo.get("tags")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _Garbage
    env["NETWORK_TAGS"] = " ".join(tags)
    for key, field in (
        ("NETWORK_SUBNET", "network"),
        ("NETWORK_GATEWAY", "gateway"),
        ("NETWORK_SUBNET6", "network6"),
        ("NETWORK_GATEWAY6", "gateway6"),
        ("NETWORK_MAC_PREFIX", "mac_prefix"),
    ):
        value = _optional_str(netinfo, field)
        if value:
            env[key] = value
    return env


def _required_str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _Garbage
    return value


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    """A string field; None when absent or null (``ToDict`` drops None values)."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Garbage
    return value


def _load_runtime_nics(run_dir: Path, instance: str) -> list[dict[str, Any]] | None:
    conf = run_dir / "kvm-hypervisor" / "conf"
    data = _read_file(conf, f"{instance}.runtime", MAX_RUNTIME_FILE)
    if data is None:
        return None
    import json  # only once a tap file matched: most calls never get here

    try:
        runtime = json.loads(data[0])
    except (ValueError, RecursionError):
        return None
    if not isinstance(runtime, list) or len(runtime) < 2:
        return None
    nics = runtime[1]
    if not isinstance(nics, list) or not all(isinstance(n, dict) for n in nics):
        return None
    return nics


def _scan(run_dir: Path) -> list[tuple[str, list[_TapFile]]]:
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


def _instance_files(directory: Path) -> list[_TapFile]:
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
            if _valid_ifname(tap):
                files.append(_TapFile(name, tap, mtime_ns, seq, uuid))
        return files
    except OSError:
        return []
    finally:
        os.close(dir_fd)


def _read_file(directory: Path, name: str, limit: int) -> tuple[bytes, int] | None:
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


def _link_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/sys/class/net", name))


def _qemu_running(run_dir: Path, instance: str) -> bool:
    """Whether the process in Ganeti's pid file for the instance exists."""
    data = _read_file(run_dir / "kvm-hypervisor" / "pid", instance, 64)
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


def _valid_ifname(name: str) -> bool:
    """The kernel's rule for interface names (``dev_valid_name``)."""
    if not name or name in (".", ".."):
        return False
    try:
        if len(os.fsencode(name)) >= _IFNAMSIZ:
            return False
    except UnicodeEncodeError:
        return False
    return not any(c == "/" or c == ":" or c.isspace() for c in name)
