"""Crash recovery (issue 6): ifup SIGKILLed after each of its steps in turn, in every
mode, then ifdown or `nichooks sweep` leaves zero residue; `nichooks verify` sees the
unfinished ifup before and nothing after; a dry-run sweep changes nothing; a sweep
after a "reboot" deletes orphan OVS ports and flows; a live NIC is left alone; an
undo that failed is retried.

Each mode has a rig: the namespaces a NIC of that mode is plugged in, the NIC's
environment (as Ganeti passes it to ifup), the settings-only environment (as an
operator runs `nichooks sweep`, or Ganeti its ifdown), and what to observe, always
from outside nichooks (`ip -j`, sysctl, ovs-vsctl, ovs-ofctl). The number of steps
comes from `nichooks plan --json`, so every step of the plan is covered whatever
the plan becomes; one more kill point, during the custom ifup scripts (after every
step and the read-back, before the journal says `applied`), is covered too.

Rollback (issue 15): a step that fails before it is applied, one that fails once its
change really happened (a half-applied step), and one that applied but does not read
back (its change reverted behind nichooks' back): each time, at every step of the
plan, in every mode, exit 1 with one line and the host exactly as before the ifup.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.bridged_env import Site
from tests.integration.ovs_env import Guest as OvsGuest
from tests.integration.ovs_env import Switch, _kill
from tests.integration.routed_env import (
    GLOBAL_READY,
    OTHER4,
    OTHER6,
    PROTO,
    make_world,
    tap_sysctl_keys,
    uplink_ready,
)
from tests.support.constants import HAVE_OVS, NO_OVS, OTHER_MAC, OTHER_UUID
from tests.support.hooks import bin_path, hook_env, one_line, wait_for
from tests.support.netns import Netns, require_root
from tests.support.scripts import write_script
from tests.support.state import journal_path, journals, names_in, tap_index

MODES = ["bridged", pytest.param("openvswitch", marks=pytest.mark.skipif(not HAVE_OVS, reason=NO_OVS)),
         "routed", "ext"]
RECOVERIES = ("ifdown", "sweep", "tap-gone-sweep")
CUSTOM = "custom"  # the kill point inside the custom ifup scripts

# An ifup.d script that SIGKILLs the hook running it when the test asks: the hook
# is its parent (custom.py runs scripts directly, no shell in between).
KILLER = """if [ "$NICHOOKS_TEST_KILL_PARENT" = 1 ]; then kill -9 "$PPID"; fi
exit 0"""
# An ifdown.d script that records how it was called (ext mode's only visible effect).
# The path is in the script: a sweep runs ifdown scripts with the NIC's variables and
# PATH only, not with the environment the sweep itself was started with.
RECORDER = """echo "$NICHOOKS_CONTEXT $1" >> {record}"""


def install_scripts(conf: Path, record: Path) -> None:
    write_script(conf / "ifup.d", "50-killer", KILLER)
    write_script(conf / "ifdown.d", "50-record", RECORDER.format(record=record))
    record.touch()


# --- a mode's rig ----------------------------------------------------------------------


@dataclass
class Rig:
    mode: str
    ns: Netns                      # where the hooks run (the hypervisor host)
    tap: str
    state: Path
    conf: Path
    nic_env: Callable[..., dict[str, str]]   # ifup's environment, **overrides
    settings: dict[str, str]                 # settings only: ifdown, sweep, verify
    make_tap: Callable[[], None]             # (re)create the tap, as before ifup
    extra: Callable[[], dict[str, Any]]      # mode-specific observations
    ours: Callable[[], list[str]]            # anything of nichooks' still in place
    record: Path
    neighbour: Callable[[], tuple[str, dict[str, str]]] | None = None  # (tap, env) of a 2nd NIC
    switch: Switch | None = None   # openvswitch only

    # -- running ---------------------------------------------------------------------
    def run(self, *argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return self.ns.run(*argv, env=env, check=False, timeout=60)

    def ifup(self, tap: str | None = None, env: dict[str, str] | None = None,
             **overrides: str) -> subprocess.CompletedProcess[str]:
        return self.run(bin_path("kvm-ifup"), tap or self.tap, env=env or self.nic_env(**overrides))

    def ifdown(self, tap: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(bin_path("kvm-ifdown"), tap or self.tap, env=self.settings)

    def nichooks(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(bin_path("nichooks"), *args, env=self.settings)

    def steps(self) -> int:
        r = self.run(bin_path("nichooks"), "plan", "--json", self.tap, env=self.nic_env())
        assert r.returncode == 0, r.stderr
        return len(json.loads(r.stdout)["steps"])

    # -- observing -------------------------------------------------------------------
    def observe(self) -> dict[str, Any]:
        return {"ns": self.ns.snapshot(), **self.extra()}

    def without_tap(self, seen: dict[str, Any], *taps: str) -> dict[str, Any]:
        """What `observe` gives once the tap (or `taps`) is deleted: the same minus it."""
        gone = set(taps or [self.tap])
        out = copy.deepcopy(seen)
        out["ns"]["links"] = [lk for lk in out["ns"]["links"] if lk["ifname"] not in gone]
        out["ns"]["addrs"] = [a for a in out["ns"]["addrs"] if a[0] not in gone]
        out.pop("tap_sysctls", None)
        return out

    def raw_state(self) -> dict[str, bytes]:
        """Every file under the state directory but the lock files, by content."""
        return {str(p.relative_to(self.state)): p.read_bytes() for p in sorted(self.state.rglob("*"))
                if p.is_file() and p.parent.name != "locks"}

    def residue(self, want: dict[str, Any], got: dict[str, Any]) -> list[str]:
        """Everything that differs from a clean host, one line each (empty: none)."""
        found: list[str] = []
        flat_want = {**{f"ns.{k}": v for k, v in want["ns"].items()}, **want, "ns": None}
        flat_got = {**{f"ns.{k}": v for k, v in got["ns"].items()}, **got, "ns": None}
        for k in sorted(set(flat_want) | set(flat_got)):
            if flat_want.get(k) != flat_got.get(k):
                found.append(f"{k}: was {flat_want.get(k)!r}, now {flat_got.get(k)!r}")
        found += [f"journal {j['key']} ({j['state']})" for j in journals(self.state)]
        found += [f"{sub}/{name}" for sub in ("taps", "tmp") for name in names_in(self.state, sub)]
        found += self.ours()
        return found


def settings_env(state: Path, conf: Path, **more: str) -> dict[str, str]:
    return hook_env(state, conf, **more)


@contextmanager
def bridged_rig(tmp: Path) -> Iterator[Rig]:
    state, conf, record = tmp / "state", tmp / "conf", tmp / "record"
    state.mkdir()
    conf.mkdir()
    install_scripts(conf, record)
    # No OVSDB: a sweep must not even look for one on the machine.
    none = {"NICHOOKS_OVSDB": f"unix:{tmp / 'no-ovsdb.sock'}"}
    with Netns() as host, Netns() as guest:
        site = Site(host=host, guest=guest, state=state, conf=conf)
        site.add_bridge("br0", mtu=9000, addr="192.0.2.1/24")
        site.add_tap()

        def make_tap() -> None:
            site.add_tap()

        def neighbour() -> tuple[str, dict[str, str]]:
            site.add_tap("tap1", guest_if="eth1", guest_addr="192.0.2.3/24")
            return "tap1", site.env(INTERFACE="tap1", MAC=OTHER_MAC, INTERFACE_UUID=OTHER_UUID, **none)

        def ours() -> list[str]:
            return [f"{lk['ifname']} still on {lk['master']}" for lk in host.ipj("link", "show")
                    if lk.get("master") not in (None, ELSEWHERE) and lk["ifname"].startswith("tap")]

        yield Rig(mode="bridged", ns=host, tap="tap0", state=state, conf=conf,
                  nic_env=lambda **o: site.env(**{**none, **o}),
                  settings=settings_env(state, conf, NICHOOKS_OVSDB=none["NICHOOKS_OVSDB"]),
                  make_tap=make_tap, extra=dict, ours=ours, record=record, neighbour=neighbour)


@contextmanager
def ext_rig(tmp: Path) -> Iterator[Rig]:
    with bridged_rig(tmp) as rig:
        base = rig.nic_env
        rig.mode = "ext"
        ext = {"MODE": "ext", "LINK": "custom-net-7"}
        rig.nic_env = lambda **o: base(**{**ext, **o})
        assert rig.neighbour is not None
        neighbour = rig.neighbour

        def ext_neighbour() -> tuple[str, dict[str, str]]:
            tap, env = neighbour()
            return tap, {**env, **ext}

        rig.neighbour = ext_neighbour
        yield rig


def owned_ports(sw: Switch) -> list[str]:
    """Ports carrying nichooks' owner mark, on any bridge (through ovs-vsctl)."""
    out = json.loads(sw.vsctl("--format=json", "--columns=name,external_ids", "list", "Port"))
    found = []
    for name, ids in out["data"]:
        if any(k == "nichooks-nic" for k, _v in ids[1]):
            found.append(name)
    return sorted(found)


def ovs_view(sw: Switch) -> dict[str, Any]:
    bridges = sorted(sw.vsctl("list-br").split())
    return {"ports": {b: sorted(sw.ports(b)) for b in bridges},
            "interfaces": sorted(sw.vsctl("--bare", "--columns=name", "list", "Interface").split()),
            "flows": {b: sorted(sw.flows(b)) for b in bridges}}


def plug_guest_veth(sw: Switch, guest: OvsGuest) -> None:
    """(Re)create the guest's veth into its existing namespace, as add_guest does."""
    sw.host.ip("link", "add", guest.tap, "type", "veth", "peer", "name", "eth0", "netns", guest.ns.name)
    guest.ns.ip("link", "set", "eth0", "address", guest.mac)
    if guest.ip4:
        guest.ns.ip("addr", "add", f"{guest.ip4}/24", "dev", "eth0")
    guest.ns.ip("link", "set", "eth0", "up")


@contextmanager
def ovs_rig(tmp: Path) -> Iterator[Rig]:
    state, conf, record = tmp / "state", tmp / "conf", tmp / "record"
    state.mkdir()
    conf.mkdir()
    install_scripts(conf, record)
    with Netns() as host:
        sw = Switch(host, tmp)
        try:
            sw.start()
            sw.add_bridge("br0")
            guest = sw.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
            more = {"NICHOOKS_OVS_TIMEOUT": "5"}

            def neighbour() -> tuple[str, dict[str, str]]:
                other = sw.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
                return "tapb", sw.nic_env(state, conf, other, **more)

            def ours() -> list[str]:
                return ([f"OVS port {p}" for p in owned_ports(sw)]
                        + [f"flow {f}" for b in sw.vsctl("list-br").split() for f in sw.our_flows(b)])

            yield Rig(mode="openvswitch", ns=host, tap="tapa", state=state, conf=conf,
                      nic_env=lambda **o: sw.nic_env(state, conf, guest, **{**more, **o}),
                      settings=settings_env(state, conf, NICHOOKS_OVSDB=sw.db,
                                            OVS_RUNDIR=str(sw.dir), NICHOOKS_OVS_TIMEOUT="5"),
                      make_tap=lambda: plug_guest_veth(sw, guest),
                      extra=lambda: {"ovs": ovs_view(sw)}, ours=ours, record=record,
                      neighbour=neighbour, switch=sw)
        finally:
            sw.remove_guests()
            sw.stop()


@contextmanager
def routed_rig(tmp: Path) -> Iterator[Rig]:
    with make_world(tmp, hosts=("a",)) as world:
        a = world.a
        record = tmp / "record"
        install_scripts(a.conf, record)
        guest = world.plug(a)
        nic_uuid = guest.nic_uuid
        none = {"NICHOOKS_OVSDB": f"unix:{tmp / 'no-ovsdb.sock'}"}
        sysctl_keys = [*GLOBAL_READY, *uplink_ready(a.uplink)]

        def make_tap() -> None:
            world.plug(a, guest.ns, nic_uuid=nic_uuid)

        def extra() -> dict[str, Any]:
            seen: dict[str, Any] = {"sysctls": a.sysctls(sysctl_keys)}
            if a.ns.has_link("tap0"):
                seen["tap_sysctls"] = a.sysctls(tap_sysctl_keys("tap0"))
            return seen

        def ours() -> list[str]:
            found = []
            for fam in ("-4", "-6"):
                found += [f"rule {r}" for r in a.our_rules(fam)]
                found += [f"route {r}" for r in a.ns.ipj(fam, "route", "show", "table", "all")
                          if r.get("protocol") == PROTO]
                found += [f"proxy {p}" for p in a.proxies(fam) if p.get("protocol") == PROTO]
            return found

        def neighbour() -> tuple[str, dict[str, str]]:
            other = world.plug(a, tap="tap1", mac=OTHER_MAC, addr4=OTHER4, addr6=OTHER6)
            return "tap1", world.env(a, other, **none)

        yield Rig(mode="routed", ns=a.ns, tap="tap0", state=a.state, conf=a.conf,
                  nic_env=lambda **o: world.env(a, guest, **{**none, **o}),
                  settings=settings_env(a.state, a.conf,
                                        NICHOOKS_IPROUTE2_DIR=str(a.iproute2),
                                        NICHOOKS_OVSDB=none["NICHOOKS_OVSDB"]),
                  make_tap=make_tap, extra=extra, ours=ours, record=record, neighbour=neighbour)


# An operator's bridge the bridged tap is found on before the rollback tests' ifups
# (`every_step_a_change`): not ours, and where the rollback must put the tap back.
ELSEWHERE = "br1"

RIGS = {"bridged": bridged_rig, "openvswitch": ovs_rig, "routed": routed_rig, "ext": ext_rig}
MIN_STEPS = {"bridged": 3, "openvswitch": 4, "routed": 10, "ext": 0}


@pytest.fixture
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    require_root()
    with RIGS[request.param](tmp_path) as r:
        yield r


# --- killing an ifup --------------------------------------------------------------------


def kill_ifup(rig: Rig, point: int | str, steps: int) -> dict[str, Any]:
    """Run ifup and have it SIGKILLed at `point` (a step number, or CUSTOM); return
    the journal it left, after checking it says the ifup did not finish."""
    if point == CUSTOM:
        r = rig.ifup(NICHOOKS_TEST_KILL_PARENT="1")
        applied = steps
    else:
        r = rig.ifup(NICHOOKS_TEST_FAULT=f"kill-after:{point}")
        applied = int(point)
    assert r.returncode == -9, (point, r.returncode, r.stderr)
    [journal] = journals(rig.state)
    assert journal["state"] == "applying", (point, journal["state"])
    assert len(journal["records"]) == applied, (point, [x["step"] for x in journal["records"]])
    assert tap_index(rig.state) == {rig.tap: journal["key"]}
    verify = rig.nichooks("verify")
    assert verify.returncode == 1, (point, verify.stdout, verify.stderr)
    assert "DRIFT" in verify.stdout and "has not finished" in verify.stdout, verify.stdout
    return journal


def recover(rig: Rig, how: str, point: int | str) -> None:
    if how == "ifdown":
        r = rig.ifdown()
        assert r.returncode == 0 and r.stderr == "", (point, how, r.stderr)
        return
    if how == "tap-gone-sweep":
        rig.ns.ip("link", "del", rig.tap)
    r = rig.nichooks("sweep")
    assert r.returncode == 0, (point, how, r.stdout, r.stderr)
    what = "undone" if how == "tap-gone-sweep" else "rolled-back"
    assert any(ln.startswith(f"{what}: ") and rig.tap in ln for ln in r.stdout.splitlines()), \
        (point, how, r.stdout)


@pytest.mark.parametrize("rig", MODES, indirect=True)
def test_ifup_killed_after_every_step_leaves_no_residue(rig: Rig) -> None:
    """SIGKILL after step 1, 2, ... N of the plan and inside the custom ifup scripts;
    recover by (a) ifdown, (b) a sweep with the tap still there (the journal is
    `applying` and no process holds its lock: roll back), (c) the tap deleted, then
    a sweep (undo what the kernel did not take with the tap). Each time: the host as
    it was before the ifup, no journal, no tap index entry, nothing of ours left."""
    steps = rig.steps()
    assert steps >= MIN_STEPS[rig.mode], steps
    if rig.mode == "ext":
        assert steps == 0
    points: list[int | str] = [*range(1, steps + 1), CUSTOM]
    tried = residue = 0
    start = time.monotonic()
    for n, point in enumerate(points):
        for how in RECOVERIES:
            before = rig.observe()
            kill_ifup(rig, point, steps)
            recover(rig, how, point)
            want = rig.without_tap(before) if how == "tap-gone-sweep" else before
            found = rig.residue(want, rig.observe())
            tried += 1
            residue += bool(found)
            assert not found, f"{rig.mode}: killed at {point}, recovered by {how}: {found}"
            # (verify reads the same journals `residue` just found none of: once per
            # kill point is enough, after each kind of recovery in turn)
            if how == RECOVERIES[n % len(RECOVERIES)] or point == CUSTOM:
                verify = rig.nichooks("verify")
                assert verify.returncode == 0, (point, how, verify.stdout)
                assert "no NICs journaled" in verify.stdout, verify.stdout
            if how == "tap-gone-sweep":
                rig.make_tap()
    # The ext NIC's ifdown scripts ran for the vanished tap, once per sweep that
    # undid it (and for every ifdown), with the context saying why.
    calls = rig.record.read_text().splitlines()
    assert calls.count(f"vanished {rig.tap}") == len(points), calls
    assert calls.count(f"shutdown {rig.tap}") == len(points), calls
    print(f"\n{rig.mode}: {steps} steps + custom scripts, {tried} (step, recovery) fault cases, "
          f"{residue} with residue, {time.monotonic() - start:.1f}s")


# --- rollback of a step that failed, or applied but does not read back -----------------

PLUMBED = [m for m in MODES if m != "ext"]  # ext has no steps to fail
INJECTED = {"fail-at": "injected fault (NICHOOKS_TEST_FAULT)",
            "fail-after": "injected fault after the step was applied (NICHOOKS_TEST_FAULT)"}


def every_step_a_change(rig: Rig) -> list[str]:
    """Make the host differ from the plan in every step (the tap's MAC not fe..., the
    bridged tap found down on another bridge, an operator's, so that undoing the attach must put it back there
    rather than merely detach it; the OVS tap's MTU other than its bridge's; the routed
    tap's forwarding off), so that each step really changes something; return the
    steps as `nichooks plan` describes them, in order. The read-back test proves it for
    every step it reverts: reverting a step fails its read-back only if the step
    changed the value."""
    if rig.mode in ("bridged", "openvswitch"):
        # The MAC step writes "fe" + the tap's MAC[2:]: a random veth MAC starts with fe
        # one time in 64, and then the step would change nothing.
        rig.ns.ip("link", "set", rig.tap, "address", "02:00:00:00:0b:01")
    if rig.mode == "bridged":
        # As an operator makes a bridge: MTU and MAC set after creation, so that the
        # kernel keeps them whatever ports come and go.
        rig.ns.ip("link", "add", ELSEWHERE, "type", "bridge")
        rig.ns.ip("link", "set", ELSEWHERE, "mtu", "1500")
        rig.ns.ip("link", "set", ELSEWHERE, "address", "02:00:00:00:00:02")
        rig.ns.ip("link", "set", ELSEWHERE, "up")
        rig.ns.ip("link", "set", rig.tap, "master", ELSEWHERE)
    if rig.mode == "openvswitch":
        rig.ns.ip("link", "set", rig.tap, "mtu", "1400")
    if rig.mode == "routed":
        for family in ("ipv4", "ipv6"):
            rig.ns.run("sysctl", "-qw", f"net.{family}.conf.{rig.tap}.forwarding=0")
    r = rig.run(bin_path("nichooks"), "plan", rig.tap, env=rig.nic_env())
    assert r.returncode == 0, r.stderr
    steps = re.findall(r"^  \d+\. (.*)$", r.stdout, re.MULTILINE)
    assert len(steps) == rig.steps() >= MIN_STEPS[rig.mode], r.stdout
    return steps


@pytest.mark.parametrize("fault", ["fail-at", "fail-after"])
@pytest.mark.parametrize("rig", PLUMBED, indirect=True)
def test_failed_step_rolls_back_everything(rig: Rig, fault: str) -> None:
    """Step N fails before it is applied (`fail-at`), or once its change was made
    (`fail-after`: the kernel took step N, then the ifup fails, so rollback must undo a
    half-applied step too), for every N: exit 1, one line naming step N and the cause,
    and the host as before the ifup (links, addresses, rules, routes, proxies, VLANs;
    the OVS ports, interfaces and flows; the routed sysctls; the bridged tap back on
    the bridge it was found on), no journal, no tap index entry, nothing of ours."""
    steps = every_step_a_change(rig)
    before = rig.observe()
    for number, step in enumerate(steps, 1):
        r = rig.ifup(NICHOOKS_TEST_FAULT=f"{fault}:{number}")
        assert r.returncode == 1, (fault, number, r.returncode, r.stderr)
        line = one_line(r.stderr)
        assert line.endswith(f": step {step}: {INJECTED[fault]}"), (fault, number, line)
        found = rig.residue(before, rig.observe())
        assert not found, f"{rig.mode}: {fault}:{number} ({step}): {found}"
        if rig.mode == "bridged":  # (in `residue` too, through the snapshot: said plainly)
            assert rig.ns.link(rig.tap).get("master") == ELSEWHERE, (fault, number)


@pytest.mark.parametrize("rig", PLUMBED, indirect=True)
def test_step_that_does_not_read_back_is_rolled_back(rig: Rig) -> None:
    """Every step applies, then step N's change is reverted behind nichooks' back
    (`drift:N`: its own undo, run by the hook after the last step, as another tool
    would), for every N: the read-back sees the kernel differ, so exit 1, one line
    saying which step did not read back, and the host as before the ifup, no journal.

    Not the OVS tap's MTU: ovs-vswitchd sets the port's mtu_request (the same value)
    on the tap again whenever it sees the MTU change, so whether the read-back still
    sees the reverted MTU is a race. Exactly that one step is left out."""
    steps = every_step_a_change(rig)
    racy = [s for s in steps if rig.mode == "openvswitch" and s.startswith(f"set {rig.tap} MTU to ")]
    assert len(racy) == (rig.mode == "openvswitch"), steps
    before = rig.observe()
    for number, step in enumerate(steps, 1):
        if step in racy:
            continue
        r = rig.ifup(NICHOOKS_TEST_FAULT=f"drift:{number}")
        assert r.returncode == 1, (number, step, r.returncode, r.stderr)
        line = one_line(r.stderr)
        assert f": step verify {step}: read back: " in line, (number, line)
        found = rig.residue(before, rig.observe())
        assert not found, f"{rig.mode}: drift:{number} ({step}): {found}"


# --- the sweep beside live NICs ---------------------------------------------------------


@pytest.mark.parametrize("rig", MODES, indirect=True)
def test_sweep_leaves_a_live_nic_alone_while_it_rolls_back_a_neighbour(rig: Rig) -> None:
    """A fully applied NIC is not touched by a sweep, nor by a sweep that rolls back a
    killed ifup of another NIC on the same host; verify calls it ok before and after."""
    assert rig.neighbour is not None
    tap1, env1 = rig.neighbour()
    empty = rig.observe()
    up = rig.ifup(tap1, env=env1)
    assert up.returncode == 0, up.stderr
    live = rig.observe()
    live_journal = journals(rig.state)
    assert [j["state"] for j in live_journal] == ["applied"]

    r = rig.nichooks("sweep")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines() == ["sweep: 0 findings, 0 failed"], r.stdout
    assert rig.observe() == live and journals(rig.state) == live_journal

    steps = rig.steps()
    point: int | str = max(1, steps - 1) if steps else CUSTOM
    kill_ifup_beside(rig, point)
    r = rig.nichooks("sweep")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [ln.split(":")[0] for ln in r.stdout.splitlines()[:-1]] == ["rolled-back"], r.stdout
    assert rig.observe() == live
    assert journals(rig.state) == live_journal
    verify = rig.nichooks("verify")
    assert verify.returncode == 0, verify.stdout
    assert verify.stdout.startswith("ok ") and tap1 in verify.stdout, verify.stdout

    down = rig.ifdown(tap1)
    assert down.returncode == 0, down.stderr
    assert not rig.residue(empty, rig.observe())


def kill_ifup_beside(rig: Rig, point: int | str) -> None:
    r = (rig.ifup(NICHOOKS_TEST_KILL_PARENT="1") if point == CUSTOM
         else rig.ifup(NICHOOKS_TEST_FAULT=f"kill-after:{point}"))
    assert r.returncode == -9, r.stderr
    assert sorted(j["state"] for j in journals(rig.state)) == ["applied", "applying"]


# --- dry run, reboot, failed undo (Open vSwitch: every kind of finding at once) --------


@pytest.fixture
def ovs(tmp_path: Path) -> Iterator[Rig]:
    if not HAVE_OVS:
        pytest.skip("openvswitch-switch is not installed")
    require_root()
    with ovs_rig(tmp_path) as r:
        yield r


def test_dry_run_sweep_reports_and_changes_nothing(ovs: Rig) -> None:
    """One NIC whose ifup was killed (tap present), one whose tap vanished after a
    full plug, one whose journal is gone (its port and flows are orphans): the dry
    run names all four findings and changes neither the host nor the state
    directory; the real sweep then leaves nothing."""
    sw = ovs.switch
    assert sw is not None
    clean = ovs.observe()
    b = sw.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
    c = sw.add_guest("tapc", "52:54:00:00:00:0c", "10.0.0.3/24")
    with_taps = ovs.observe()
    env = {"NICHOOKS_OVS_TIMEOUT": "5"}
    # b: fully plugged, then its tap vanishes without an ifdown
    assert ovs.ifup("tapb", env=sw.nic_env(ovs.state, ovs.conf, b, **env)).returncode == 0
    # c: fully plugged, then its journal and its tap go (as in a reboot)
    assert ovs.ifup("tapc", env=sw.nic_env(ovs.state, ovs.conf, c, **env)).returncode == 0
    journal_path(ovs.state, c.uuid).unlink()
    (ovs.state / "taps" / "tapc").unlink()
    sw.host.ip("link", "del", "tapb")
    sw.host.ip("link", "del", "tapc")
    # a: ifup killed after the port and its flows exist
    steps = ovs.steps()
    kill = ovs.ifup(NICHOOKS_TEST_FAULT=f"kill-after:{steps - 1}")
    assert kill.returncode == -9

    host_before, files_before = ovs.observe(), ovs.raw_state()
    dry = ovs.nichooks("sweep", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    lines = dry.stdout.splitlines()
    kinds = sorted(ln.split(":")[0] for ln in lines[:-1])
    assert kinds == ["orphan-flows", "orphan-port", "rolled-back", "undone"], dry.stdout
    assert all("would" in ln for ln in lines[:-1]), dry.stdout
    assert lines[-1] == "sweep (dry run): 4 findings, 0 failed", dry.stdout
    assert any(ln.startswith("orphan-port: tapc:") and c.uuid in ln for ln in lines), dry.stdout
    assert ovs.observe() == host_before
    assert ovs.raw_state() == files_before
    assert owned_ports(sw) == ["tapa", "tapb", "tapc"]

    real = ovs.nichooks("sweep")
    assert real.returncode == 0, real.stdout + real.stderr
    assert sorted(ln.split(":")[0] for ln in real.stdout.splitlines()[:-1]) == kinds, real.stdout
    assert not ovs.residue(ovs.without_tap(with_taps, "tapb", "tapc"), ovs.observe())
    again = ovs.nichooks("sweep")
    assert again.stdout.strip() == "sweep: 0 findings, 0 failed", again.stdout
    assert clean["ovs"] == ovs.observe()["ovs"]


def test_sweep_after_a_reboot_deletes_orphan_ports_and_flows(ovs: Rig) -> None:
    """/run is empty after a reboot, OVSDB still has the ports nichooks made (with
    nichooks-nic=<uuid>) and, here, their flows. The sweep deletes those and only
    those: a port and a flow that are not ours stay."""
    sw = ovs.switch
    assert sw is not None
    before = ovs.observe()
    up = ovs.ifup()
    assert up.returncode == 0, up.stderr
    assert owned_ports(sw) == ["tapa"] and sw.our_flows("br0")
    # Not ours: a port without the owner mark, and a flow with another cookie.
    sw.host.ip("link", "add", "other0", "type", "veth", "peer", "name", "other1")
    sw.vsctl("add-port", "br0", "other0", "--", "set", "interface", "other0",
             "external_ids:iface-id=someone-else")
    sw.ofctl("add-flow", f"unix:{sw.dir / 'br0.mgmt'}", "cookie=0x1234,priority=5,arp,actions=normal")
    foreign = ovs.observe()["ovs"]

    for sub in ("nics", "taps"):
        for p in (ovs.state / sub).iterdir():
            p.unlink()
        (ovs.state / sub).rmdir()
    sw.host.ip("link", "del", "tapa")  # the guest's tap went with the reboot too

    r = ovs.nichooks("sweep")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.startswith("orphan-port: tapa:") and ovs.nic_env()["INTERFACE_UUID"] in ln
               for ln in lines), r.stdout
    assert any(ln.startswith("orphan-flows: br0:") for ln in lines), r.stdout
    assert owned_ports(sw) == [] and sw.our_flows("br0") == []
    after = ovs.observe()["ovs"]
    assert after["ports"] == {"br0": ["other0"]}
    assert "cookie=0x1234" in " ".join(after["flows"]["br0"])
    assert after["flows"] == {b: sorted(set(f) - {x for x in f if "cookie=0x4e48" in x})
                              for b, f in foreign["flows"].items()}
    assert ovs.nichooks("sweep").stdout.strip() == "sweep: 0 findings, 0 failed"
    sw.vsctl("del-port", "br0", "other0")
    sw.ofctl("del-flows", f"unix:{sw.dir / 'br0.mgmt'}", "cookie=0x1234/-1")
    sw.host.ip("link", "del", "other0")
    assert ovs.observe() == ovs.without_tap(before)
    assert journals(ovs.state) == []


@contextmanager
def ovsdb_down(sw: Switch) -> Iterator[None]:
    """ovsdb-server stopped (a package upgrade, a crash) for the block, then started
    again on the same database; returns once ovs-vswitchd has reconnected."""
    d = sw.dir
    _kill(int((d / "ovsdb-server.pid").read_text().strip()))
    wait_for("ovsdb-server to stop", lambda: not (d / "db.sock").exists() or not _serving(sw))
    try:
        yield
    finally:
        subprocess.run(["ovsdb-server", str(d / "conf.db"), f"--remote=p{sw.db}",
                        f"--pidfile={d / 'ovsdb-server.pid'}", f"--unixctl={d / 'ovsdb-server.ctl'}",
                        f"--log-file={d / 'ovsdb-server.log'}", "--detach"],
                       check=True, env=sw.env(), capture_output=True)
        # A change ovs-vsctl waits for ovs-vswitchd to apply: it has reconnected.
        sw.vsctl("set", "bridge", "br0", "external_ids:nichooks-test-sync=1")
        sw.vsctl("remove", "bridge", "br0", "external_ids", "nichooks-test-sync")


def _serving(sw: Switch) -> bool:
    r = subprocess.run(["ovs-vsctl", f"--db={sw.db}", "--timeout=1", "--no-wait", "show"],
                       capture_output=True, env=sw.env())
    return r.returncode == 0


def test_failed_undo_is_retried_by_the_sweep(ovs: Rig) -> None:
    """ifdown while ovsdb-server is down: the port's undo fails and stays in the
    journal (`undo-failed`, the record `failed`); verify reports it; once OVSDB is
    back a sweep retries it: no port, no flow, no journal, verify clean."""
    sw = ovs.switch
    assert sw is not None
    before = ovs.observe()
    up = ovs.ifup()
    assert up.returncode == 0, up.stderr
    with ovsdb_down(sw):
        down = ovs.ifdown()
        assert down.returncode == 0, down.stderr
        assert "could not undo" in down.stderr and "kept in the journal" in down.stderr, down.stderr
        [journal] = journals(ovs.state)
        assert journal["state"] == "undo-failed"
        # the port (and the flows: their undo finds the bridge through OVSDB too)
        assert "ovs.port" in [r["kind"] for r in journal["records"]], journal["records"]
        assert {r["status"] for r in journal["records"]} == {"failed"}, journal["records"]
    assert owned_ports(sw) == ["tapa"]
    verify = ovs.nichooks("verify")
    assert verify.returncode == 1 and "pending a retry" in verify.stdout, verify.stdout

    r = ovs.nichooks("sweep")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith("retried: "), r.stdout
    found = ovs.residue(before, ovs.observe())
    assert not found, found
    verify = ovs.nichooks("verify")
    assert verify.returncode == 0 and "no NICs journaled" in verify.stdout, verify.stdout
