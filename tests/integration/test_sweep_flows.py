"""The sweep of orphan OpenFlow flows against a real ovsdb-server + ovs-vswitchd.

A cookie whose top 16 bits are 0x4e48 proves nothing: other software shares the
switch and picks its own cookies (a Neutron agent a random one at every restart).
The sweep deletes a flow only where a plug adds flows, shaped like ours, on a port
that carries our owner mark, with the exact cookie of the NIC that mark names; and
only under that NIC's lock, so a hook plugging it right now keeps what it plugs.
Everything is observed through ovs-ofctl / ovs-vsctl.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nichooks.host.openflow import cookie
from tests.integration.ovs_env import Guest, Switch
from tests.integration.test_ovs import plug
from tests.support.constants import HAVE_OVS, NO_OVS
from tests.support.hooks import bin_path
from tests.support.state import journal_path

pytestmark = pytest.mark.skipif(not HAVE_OVS, reason=NO_OVS)

# A cookie with our prefix that no NIC key hashes to (what a Neutron agent may pick).
RANDOM_COOKIE = 0x4E48_5EED_0BAD_F00D


def mgmt(sw: Switch, bridge: str) -> str:
    return f"unix:{sw.dir / (bridge + '.mgmt')}"


def ofport(sw: Switch, name: str) -> int:
    number = sw.row("Interface", name, "ofport")["ofport"]
    assert isinstance(number, int) and number > 0, number
    return number


def add_flow(sw: Switch, bridge: str, flow: str) -> None:
    sw.ofctl("add-flow", mgmt(sw, bridge), flow)


def orphan(sw: Switch, dirs: tuple[Path, Path], guest: Guest) -> str:
    """What a lost state directory leaves: the NIC's journal and tap index entry gone,
    its tap gone with the guest; OVSDB keeps the port (with its owner mark) and
    ovs-vswitchd the flows. Returns the journal's text, for a test to put it back."""
    journal = journal_path(dirs[0], guest.uuid)
    text = journal.read_text()
    journal.unlink()
    (dirs[0] / "taps" / guest.tap).unlink()
    sw.host.ip("link", "del", guest.tap)
    return text


def sweep(sw: Switch, dirs: tuple[Path, Path], guest: Guest, **env: str
          ) -> subprocess.CompletedProcess[str]:
    return sw.hook("nichooks", "sweep", env=sw.nic_env(*dirs, guest, **env))


def flows_with(sw: Switch, bridge: str, value: int) -> list[str]:
    return sw.flows(bridge, f"cookie=0x{value:016x}/-1")


@contextmanager
def nic_lock(dirs: tuple[Path, Path], key: str) -> Iterator[None]:
    """Hold the NIC's lock file as a hook does (an flock on locks/nic-<key>.lock)."""
    path = dirs[0] / "locks" / f"nic-{key}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float,
                  seen: list[str]) -> bool:
    """Read proc's stderr (into `seen`) until a line contains `needle` (True) or it
    ends (False)."""
    assert proc.stderr is not None
    end = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while time.monotonic() < end:
            if not sel.select(max(end - time.monotonic(), 0)):
                continue
            line = proc.stderr.readline()
            if not line:
                return False
            seen.append(line)
            if needle in line:
                return True
    raise AssertionError(f"no {needle!r} from the sweep within {timeout:g}s: {seen}")


# -- bridges where a plug adds no flows ------------------------------------------------------
@pytest.mark.parametrize("kind", ["fail_mode=secure", "controller", "antispoof-off"])
def test_flows_on_a_bridge_where_we_add_none_survive_the_sweep(
        switch: Switch, dirs: tuple[Path, Path], kind: str) -> None:
    """On a fail_mode=secure bridge, one with a controller, or any bridge with
    anti-spoofing off, a plug adds no flows: whatever flows are there belong to the
    controller, even shaped exactly like ours, with our prefix or with the very
    cookie of an orphaned NIC of ours. The orphan's port is still deleted."""
    switch.add_bridge("br1", *(["fail_mode=secure"] if kind == "fail_mode=secure" else []))
    if kind == "controller":
        switch.vsctl("set-controller", "br1", "tcp:127.0.0.1:6653")
    env = {"NICHOOKS_OVS_ANTISPOOF": "off"} if kind == "antispoof-off" else {}
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    plug(switch, dirs, a, LINK="br1", **env)
    assert switch.our_flows("br1") == []
    port = ofport(switch, "tapa")
    # What a controller may have put there: our priorities, on the port we plugged.
    add_flow(switch, "br1", f"cookie=0x{RANDOM_COOKIE:x},priority=1000,in_port={port},actions=drop")
    add_flow(switch, "br1", f"cookie=0x{cookie(a.uuid):x},priority=1100,in_port={port},"
                            "arp,actions=NORMAL")
    before = sorted(switch.flows("br1"))
    assert len(switch.our_flows("br1")) == 2
    orphan(switch, dirs, a)

    r = sweep(switch, dirs, a, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(switch.flows("br1")) == before, r.stdout
    assert switch.ports("br1") == set()
    assert "orphan-port: tapa:" in r.stdout, r.stdout
    assert "orphan-flows" not in r.stdout, r.stdout


# -- a normal bridge: only what is provably ours goes ------------------------------------------
def test_only_provably_own_orphan_flows_are_swept(switch: Switch, dirs: tuple[Path, Path]) -> None:
    """On a bridge where a plug adds flows, an orphaned NIC's own flows (its journal
    deleted behind our back) and its port are deleted. Flows with our prefix stay when
    any proof is missing: not at one of our priorities (even with the orphan's own
    cookie on its port), not on a port with our owner mark (even with the orphan's
    cookie at our priority), or with a cookie no NIC of ours has (even at our priority
    on the orphan's port). A live NIC's flows are untouched."""
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    b = switch.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
    plug(switch, dirs, a)
    plug(switch, dirs, b)
    switch.host.ip("link", "add", "other0", "type", "veth", "peer", "name", "other1")
    switch.vsctl("add-port", "br0", "other0", "--", "set", "interface", "other0",
                 "external_ids:iface-id=someone-else")
    pa, other = ofport(switch, "tapa"), ofport(switch, "other0")
    mine = cookie(a.uuid)
    foreign = [
        f"cookie=0x{mine:x},priority=5,in_port={pa},actions=drop",
        f"cookie=0x{mine:x},priority=1000,in_port={other},actions=drop",
        f"cookie=0x{RANDOM_COOKIE:x},priority=1000,in_port={pa},ip,actions=drop",
        f"cookie=0x{RANDOM_COOKIE:x},priority=1100,in_port={other},arp,actions=NORMAL",
    ]
    for flow in foreign:
        add_flow(switch, "br0", flow)
    b_flows = flows_with(switch, "br0", cookie(b.uuid))
    assert b_flows
    own = [f for f in flows_with(switch, "br0", mine) if "priority=5," not in f
           and f"in_port={other}" not in f]
    assert len(own) > 10
    everything = sorted(switch.flows("br0"))
    orphan(switch, dirs, a)

    r = sweep(switch, dirs, a)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(switch.flows("br0")) == sorted(set(everything) - set(own)), r.stdout
    assert flows_with(switch, "br0", cookie(b.uuid)) == b_flows
    assert len(switch.our_flows("br0")) == len(b_flows) + len(foreign)
    assert switch.ports("br0") == {"tapb", "other0"}
    assert "orphan-port: tapa:" in r.stdout, r.stdout
    assert f"orphan-flows: br0: deleted {len(own)} flows of {a.uuid}" in r.stdout, r.stdout
    again = sweep(switch, dirs, a)
    assert again.stdout.strip() == "sweep: 0 findings, 0 failed", again.stdout
    switch.host.ip("link", "del", "other0")


# -- the NIC's lock ---------------------------------------------------------------------------
def test_sweep_racing_a_plug_keeps_the_plugs_flows(switch: Switch, dirs: tuple[Path, Path]) -> None:
    """A hook that holds the NIC's lock may be about to write its journal (an ifup
    between undoing the NIC's earlier plug and saving the new journal). The sweep
    finds the NIC's port and flows unclaimed, waits for the lock, looks again, finds
    the journal, and deletes nothing."""
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    plug(switch, dirs, a)
    flows = sorted(switch.flows("br0"))
    assert switch.our_flows("br0")
    journal = orphan(switch, dirs, a)
    with nic_lock(dirs, a.uuid):
        proc = subprocess.Popen(
            ["ip", "netns", "exec", switch.host.name, bin_path("nichooks"), "-v", "sweep"],
            env=switch.nic_env(*dirs, a), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        seen: list[str] = []
        try:
            # The sweep says it found the orphan and goes for its lock (today's code
            # never says so: it deletes the flows without the lock, then exits).
            waiting = wait_for_line(proc, f"owner={a.uuid} result=orphan ", 30, seen)
            journal_path(dirs[0], a.uuid).write_text(journal)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    out, err = proc.communicate(timeout=30)
    err = "".join(seen) + err
    assert proc.returncode == 0, out + err
    assert sorted(switch.flows("br0")) == flows, out + err
    assert waiting, err
    assert "a journal claims it now" in err, err  # looked again under the lock
    assert out.strip() == "sweep: 0 findings, 0 failed", out
    assert switch.ports("br0") == {"tapa"}


def test_sweep_leaves_a_busy_nics_port_and_flows_for_later(
        switch: Switch, dirs: tuple[Path, Path]) -> None:
    """A hook holding the NIC's lock past the sweep's wait: the orphan port and the
    flows are both left, reported busy; the next sweep, the lock free, deletes both."""
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    plug(switch, dirs, a)
    flows = sorted(switch.flows("br0"))
    orphan(switch, dirs, a)
    with nic_lock(dirs, a.uuid):
        r = sweep(switch, dirs, a)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(switch.flows("br0")) == flows, r.stdout
    assert switch.ports("br0") == {"tapa"}
    assert "busy: tapa:" in r.stdout and "busy: br0:" in r.stdout, r.stdout
    assert "orphan-" not in r.stdout, r.stdout
    r = sweep(switch, dirs, a)
    assert "orphan-port: tapa:" in r.stdout and "orphan-flows: br0:" in r.stdout, r.stdout
    assert switch.our_flows("br0") == [] and switch.ports("br0") == set()
