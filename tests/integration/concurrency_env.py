"""Many hooks at once: start them together, wait for all under a deadline (a deadlock
fails the test instead of hanging it), and read back the state directory.

Everything is observed from outside: hook exit statuses and stderr, the journal files
as JSON, the tap index as files; never through nichooks' own Store.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import signal
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.ovs_env import Switch
from tests.integration.ovs_env import _plain as plain
from tests.support.hooks import bin_path
from tests.support.netns import Netns
from tests.support.scripts import write_script
from tests.support.state import journals, names_in, tap_index

# Custom ifup script (runs while the hook holds the NIC's locks): proves mutual
# exclusion (mkdir is atomic: a second holder at the same time cannot create the
# directory) and records the order in which ifups held the lock, by INSTANCE, with
# the time (epoch seconds) at which each one held it. It also creates held/INSTANCE,
# which puts the ifup into a Trail (below) among what the other holders did.
ORDER_SCRIPT = """d="$NICHOOKS_STATE_DIR/order"
if ! mkdir "$d/inside-$INTERFACE" 2>/dev/null; then
    echo "$INSTANCE" >> "$d/overlaps"
fi
echo "$INSTANCE $(date +%s.%N)" >> "$d/ifups"
: > "$d/held/$INSTANCE"
sleep 0.01
rmdir "$d/inside-$INTERFACE" 2>/dev/null
exit 0"""

# Custom ifdown script (runs once per plug an ifdown undid, after its locks are
# released): which call ($ORDER_CALL, set by the test) undid which plug ($INSTANCE and
# $INTERFACE come from the journal it undid) while called for which tap ($1).
DOWN_SCRIPT = """echo "${ORDER_CALL:--} $1 $INSTANCE $INTERFACE" >> "$NICHOOKS_STATE_DIR/order/downs"
exit 0"""


@dataclass
class Call:
    """One hook run: `hook` is kvm-ifup or kvm-ifdown."""

    label: str
    hook: str
    args: tuple[str, ...]
    env: dict[str, str]
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    started: float = 0.0
    ended: float = 0.0
    epoch: float = 0.0  # time.time() at start, to compare with times the hook's scripts log

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def __repr__(self) -> str:
        return (f"<{self.label}: {self.hook} {' '.join(self.args)} rc={self.returncode} "
                f"{self.seconds:.2f}s stderr={self.stderr!r}>")


@dataclass
class Wave:
    """Calls started together; `wall` from the first start to the last exit."""

    name: str
    calls: list[Call]
    wall: float = 0.0
    notes: list[str] = field(default_factory=list)

    def failed(self) -> list[Call]:
        return [c for c in self.calls if c.returncode != 0 or c.stderr != ""]

    def summary(self) -> str:
        secs = sorted(c.seconds for c in self.calls)
        return (f"{self.name}: {len(self.calls)} concurrent calls, wall {self.wall:.2f}s, "
                f"per call min {secs[0]:.2f}s median {statistics.median(secs):.2f}s "
                f"max {secs[-1]:.2f}s")


# Figures of this run, printed at the end of the module (pytest -s shows them) and
# available to the README's "Reliability" section.
FIGURES: list[str] = []


def run_together(ns: Netns, calls: list[Call], name: str, deadline: float = 120.0,
                 after_start: Callable[[list[int]], None] | None = None) -> Wave:
    """Start every call inside `ns` at once and wait for all of them. If any is still
    running after `deadline` seconds, kill the stragglers (each by its own process
    group: only what this function started) and fail: that is a deadlock or a hang.
    `after_start`, if given, gets the calls' pids once all are started (the hook's pid:
    `ip netns exec` execs it)."""
    procs: list[subprocess.Popen[str]] = []
    t0 = time.monotonic()
    try:
        for call in calls:
            call.started, call.epoch = time.monotonic(), time.time()
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns.name, bin_path(call.hook), *call.args],
                env=call.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, start_new_session=True))
        if after_start is not None:
            after_start([proc.pid for proc in procs])
        pending = set(range(len(procs)))
        end = t0 + deadline
        while pending:
            for i in sorted(pending):
                if procs[i].poll() is not None:
                    calls[i].ended = time.monotonic()
                    pending.discard(i)
            if not pending:
                break
            if time.monotonic() > end:
                stuck = [calls[i].label for i in sorted(pending)]
                raise AssertionError(
                    f"{name}: {len(stuck)} of {len(calls)} calls still running after "
                    f"{deadline:g}s (deadlock?): {stuck}")
            time.sleep(0.005)
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for call, proc in zip(calls, procs, strict=False):
            out, err = proc.communicate(timeout=10)
            call.returncode, call.stdout, call.stderr = proc.returncode, out, err
    wave = Wave(name=name, calls=calls, wall=max(c.ended for c in calls) - t0)
    FIGURES.append(wave.summary())
    return wave


def ifup(label: str, tap: str, env: dict[str, str]) -> Call:
    return Call(label, "kvm-ifup", (tap,), env)


def ifdown(label: str, tap: str, env: dict[str, str], context: str = "") -> Call:
    return Call(label, "kvm-ifdown", (tap, context) if context else (tap,), env)


# -- the state directory ------------------------------------------------------------------
def assert_store_sound(state: Path) -> dict[str, dict[str, Any]]:
    """Journals parse, each is fully applied with no failed record, the tap index and
    the journals name each other one to one, no temp file is left over and nothing
    was quarantined as corrupt. Returns the journals, by key."""
    by_key = {journal["key"]: journal for journal in journals(state)}
    index = tap_index(state)
    for key, journal in by_key.items():
        assert journal["state"] == "applied", journal
        assert all(r["status"] == "pending" for r in journal["records"]), journal
        assert index.get(journal["tap"]) == key, (journal["tap"], key, index)
    assert sorted(index.values()) == sorted(by_key), (index, sorted(by_key))
    assert names_in(state, "tmp") == [], names_in(state, "tmp")
    assert not (state / "corrupt").exists(), list((state / "corrupt").iterdir())
    return by_key


def install_order_script(state: Path, conf: Path) -> Path:
    """ifup.d script recording the lock order and ifdown.d script recording what each
    ifdown undid; returns the order directory."""
    order = state / "order"
    (order / "held").mkdir(parents=True, exist_ok=True)
    write_script(conf / "ifup.d", "10-order", ORDER_SCRIPT)
    write_script(conf / "ifdown.d", "10-order", DOWN_SCRIPT)
    return order


def reset_order(order: Path) -> None:
    """Forget what earlier calls recorded (before a round)."""
    for name in ("ifups", "downs"):
        (order / name).unlink(missing_ok=True)
    for marker in (order / "held").iterdir():
        marker.unlink()


def read_down_records(order: Path) -> list[tuple[str, str, str, str]]:
    """(the ifdown call, the tap it was called for, INSTANCE and tap of the plug it
    undid) for every plug an ifdown undid, from the ifdown.d script."""
    path = order / "downs"
    lines = path.read_text().splitlines() if path.exists() else []
    records = []
    for line in lines:
        call, tap, instance, interface = line.split(" ")
        records.append((call, tap, instance, interface))
    return records


# -- the order of a NIC's lock holders, from inotify ---------------------------------------
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class Trail:
    """What the holders of the locks did, in the order they did it, as inotify reports
    it: ("held", INSTANCE) when an ifup's ifup.d script ran (it creates held/INSTANCE),
    ("deleted", lock name) when a holder deleted a lock file (engine.locks._remove_unused_locks:
    only a holder, while it still holds the lock, deletes one).

    One inotify queue keeps the order in which the kernel saw the changes. Creations of
    lock files are watched too, so that two deletions of one name are never adjacent:
    inotify would merge two identical adjacent events (the file must be created again
    before it can be deleted again). They are dropped: a waiter creates a deleted lock
    file again, outside the lock."""

    def __init__(self, held: Path, locks: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.kinds: dict[int, str] = {}
        for path, mask, kind in ((held, IN_CREATE, "held"), (locks, IN_CREATE | IN_DELETE, "lock")):
            wd = libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
            if wd < 0:
                err = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(err, f"inotify_add_watch {path}")
            self.kinds[wd] = kind
        self.seen: list[tuple[str, str]] = []

    def __enter__(self) -> Trail:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def events(self) -> list[tuple[str, str]]:
        """Every event so far, in order."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return list(self.seen)
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size: offset + _EVENT.size + length]
                offset += _EVENT.size + length
                assert not mask & IN_Q_OVERFLOW, "the inotify queue overflowed: the order is lost"
                name = raw.split(b"\0", 1)[0].decode()
                kind = self.kinds.get(wd)
                if kind == "held" and mask & IN_CREATE:
                    self.seen.append(("held", name))
                elif kind == "lock" and mask & IN_DELETE and name.endswith(".lock"):
                    self.seen.append(("deleted", name.removesuffix(".lock")))


# -- Open vSwitch, observed through ovs-vsctl / ovs-ofctl ------------------------------------
COOKIE_RE = re.compile(r"cookie=(0x[0-9a-f]+)")
IN_PORT_RE = re.compile(r"in_port=(\d+)")


def ovs_table(sw: Switch, table: str, *columns: str) -> dict[str, dict[str, Any]]:
    """Every row of `table` by name: the columns as plain Python values."""
    out = sw.vsctl("--format=json", f"--columns=name,{','.join(columns)}", "list", table)
    data = json.loads(out)
    rows = {}
    for values in data["data"]:
        row = dict(zip(data["headings"], (plain(v) for v in values), strict=True))
        rows[row.pop("name")] = row
    return rows


def vlan_columns(row: dict[str, Any]) -> tuple[Any, list[int], Any]:
    """(tag, trunks, vlan_mode) with OVSDB's empty sets as [] and one trunk as [n]."""
    trunks = row["trunks"] if isinstance(row["trunks"], list) else [row["trunks"]]
    return row["tag"], trunks, row["vlan_mode"]


def flows_by_cookie(sw: Switch, bridge: str) -> dict[int, list[str]]:
    """Our flows (cookie prefix 0x4e48) grouped by cookie."""
    grouped: dict[int, list[str]] = {}
    for flow in sw.our_flows(bridge):
        match = COOKIE_RE.search(flow)
        assert match, flow
        grouped.setdefault(int(match.group(1), 16), []).append(flow)
    return grouped


def in_ports(flows: list[str]) -> set[int]:
    ports = set()
    for flow in flows:
        match = IN_PORT_RE.search(flow)
        assert match, f"flow without a numeric in_port: {flow}"
        ports.add(int(match.group(1)))
    return ports


def journal_cookie(journal: dict[str, Any]) -> int:
    [cookie] = [int(r["undo"]["cookie"]) for r in journal["records"] if "cookie" in r["undo"]]
    return cookie


# -- pausing a hook at a chosen point -----------------------------------------------------------
SYS_CLOCK_NANOSLEEP = "230"  # x86_64: what time.sleep() blocks in


def wait_until_polling_a_lock(pid: int, timeout: float = 20.0) -> None:
    """Return once process `pid` is in filelock's poll loop (it sleeps between tries;
    nothing before the lock sleeps): 5 samples in a row blocked in clock_nanosleep."""
    if platform.machine() != "x86_64":
        time.sleep(3)
        return
    end, streak = time.monotonic() + timeout, 0
    while streak < 5:
        assert time.monotonic() < end, f"process {pid} never waited for a lock"
        try:
            syscall = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        except (OSError, IndexError):
            raise AssertionError(f"process {pid} ended before waiting for a lock") from None
        streak = streak + 1 if syscall == SYS_CLOCK_NANOSLEEP else 0
        time.sleep(0.01)
