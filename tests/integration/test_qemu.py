"""Real QEMU runs the real hooks: `-netdev tap,script=kvm-ifup,downscript=kvm-ifdown`
at start, QMP netdev_add/device_add/device_del/netdev_del for hot-plug, `quit`.

Everything happens in a namespace of the test's own; QEMU runs inside it (see
qemu_harness.py for the QEMU 7.2 facts this test relies on).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.qemu_harness import Nic, QemuVM, qemu_binary, report_qemu_accel
from tests.support.hooks import bin_path, hook_env
from tests.support.links import assert_bridge_port
from tests.support.netns import Netns
from tests.support.state import journal_path, journals, names_in

pytestmark = pytest.mark.skipif(qemu_binary() is None,
                                reason="qemu-system-x86_64 is not installed on this machine")


@pytest.fixture(autouse=True)
def qemu_accel(pytestconfig: pytest.Config) -> None:
    """KVM with `-cpu max` where it starts, else a fallback (never a skip): probed
    once, before the test's clock starts, and named in the terminal summary."""
    report_qemu_accel(pytestconfig)


# name -> (MTU, MAC). The bridges get an explicit MAC: a bridge whose MAC was never
# set takes the lowest MAC among its ports, and when its last port leaves the kernel
# gives it 00:00:00:00:00:00 -- kernel behaviour no hook controls, which would
# otherwise make the before/after comparison fail. (The test's own tap MAC check is
# what proves the bridge is never offered a guest-like MAC.) For the same reason IPv6
# is off on the bridges (they are plain L2 here): the first time a port brings a
# bridge carrier, the kernel gives it a link-local address, a fe80::/64 and a
# multicast route, and keeps them after the port has gone.
# And the MTU is set after creation (`ip link set mtu`), as an administrator does:
# only that marks it as chosen; an MTU given to `ip link add` is auto-adjusted by the
# kernel, back to 1500 once the last port has left.
BRIDGES = {"br-a": (1500, "02:00:00:00:0a:01"), "br-b": (9000, "02:00:00:00:0b:01")}

INSTANCE = "guest1.example.com"
# (nic, bridge, INTERFACE_UUID or None: a plain-QEMU spec may lack one, and the key
# is then derived from INSTANCE and MAC)
START_NICS = [
    (Nic("tapq0", "52:54:00:12:34:01"), "br-a", "3f0e1a7c-2d4b-4c59-9a8e-0c1d2e3f4a01"),
    (Nic("tapq1", "52:54:00:12:34:02"), "br-b", None),
]
HOT_NIC = (Nic("tapq2", "52:54:00:12:34:03"), "br-a", "3f0e1a7c-2d4b-4c59-9a8e-0c1d2e3f4a03")


def write_spec(state: Path, nic: Nic, bridge: str, uuid: str | None) -> None:
    """$NICHOOKS_STATE_DIR/specs/<TAP>: bash KEY=value lines, like Ganeti's Xen NIC file."""
    spec = {"INSTANCE": INSTANCE, "MAC": nic.mac, "MODE": "bridged", "LINK": bridge}
    if uuid:
        spec["INTERFACE_UUID"] = uuid
    specs = state / "specs"
    specs.mkdir(exist_ok=True)
    (specs / nic.tap).write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in spec.items()))


def taps(ns: Netns) -> list[str]:
    return [link["ifname"] for link in ns.ipj("-d", "link", "show")
            if link.get("linkinfo", {}).get("info_kind") == "tun"]


def ports(ns: Netns, bridge: str) -> list[str]:
    return [link["ifname"] for link in ns.ipj("link", "show", "master", bridge)]


def snapshot_diff(before: Any, after: Any, path: str = "") -> list[str]:
    """Readable differences between two (comparable) snapshots."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            out += snapshot_diff(before.get(key), after.get(key), f"{path}.{key}")
        return out
    if (isinstance(before, list) and isinstance(after, list) and len(before) == len(after)
            and all(isinstance(x, dict) for x in before + after)):
        out = []
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            out += snapshot_diff(b, a, f"{path}[{b.get('ifname', i)}]")
        return out
    return [] if before == after else [f"{path}: before {before!r}, after {after!r}"]


def hook_errors(log: str) -> list[str]:
    """Lines in QEMU's output that report a hook problem. A failing downscript fails
    nothing in QEMU: this log is the only place it shows."""
    return [line for line in log.splitlines()
            if "nichooks" in line or "network script" in line or "Traceback" in line]


def test_qemu_start_hotplug_unplug_quit(netns: Netns, dirs: tuple[Path, Path]) -> None:
    t0 = time.monotonic()
    state, conf = dirs
    ifup, ifdown = bin_path("kvm-ifup"), bin_path("kvm-ifdown")
    for name, (mtu, mac) in BRIDGES.items():
        netns.ip("link", "add", name, "address", mac, "type", "bridge")
        netns.ip("link", "set", name, "mtu", str(mtu), "up")
        netns.run("sysctl", "-q", "-w", f"net.ipv6.conf.{name}.disable_ipv6=1")
    for nic, bridge, uuid in [*START_NICS, HOT_NIC]:
        write_spec(state, nic, bridge, uuid)
    before = netns.snapshot()

    # QEMU hands its environment on to the scripts: this is all they get.
    env = hook_env(state, conf)
    vm = QemuVM(netns, [nic for nic, _, _ in START_NICS], script=ifup, downscript=ifdown,
                env=env)
    try:
        with vm:
            # -- start: the monitor answers only after every script= succeeded
            for nic, bridge, _ in START_NICS:
                assert_bridge_port(netns, nic.tap, bridge)
            assert len(journals(state)) == len(START_NICS), names_in(state, "nics")
            assert journal_path(state, str(START_NICS[0][2])).exists()
            assert sorted(ports(netns, "br-a")) == ["tapq0"]
            assert sorted(ports(netns, "br-b")) == ["tapq1"]
            assert hook_errors(vm.log()) == []

            # -- hot-plug: netdev_add runs script= (its failure would be the QMP error)
            hot, hot_bridge, hot_uuid = HOT_NIC
            hot_journal = journal_path(state, hot_uuid)
            vm.hotplug(hot)
            assert_bridge_port(netns, hot.tap, hot_bridge)
            assert sorted(ports(netns, "br-a")) == ["tapq0", "tapq2"]
            assert hot_journal.exists()
            assert len(journals(state)) == 3
            assert hook_errors(vm.log()) == []

            # -- hot-unplug, step 1: device_del. On QEMU 7.2's `pc` machine this is an
            # ACPI request to the guest; with no guest OS to eject the slot, no
            # DEVICE_DELETED ever comes and the device stays (a second device_del in
            # prelaunch state is refused: "already in the process of unplug").
            # Either way the netdev, so the tap, is untouched: no hook runs here.
            deleted = vm.device_del(hot, timeout=1.0)
            if not deleted:
                assert vm.qmp is not None
                peripherals = {p["name"] for p in vm.qmp.execute(
                    "qom-list", path="/machine/peripheral")}
                assert hot.device in peripherals
            assert_bridge_port(netns, hot.tap, hot_bridge)
            assert hot_journal.exists()

            # -- hot-unplug, step 2: netdev_del runs downscript= and closes the tap
            # fd, even though the (never ejected) device still points at it. It
            # succeeds whatever the downscript does: only QEMU's stderr tells.
            vm.netdev_del(hot)
            assert hook_errors(vm.log()) == []
            assert hot.tap not in ports(netns, hot_bridge)
            if netns.has_link(hot.tap):  # only a persistent tap would survive
                assert netns.link(hot.tap).get("master") is None
            assert not hot_journal.exists()
            assert len(journals(state)) == len(START_NICS), names_in(state, "nics")
            for nic, bridge, _ in START_NICS:  # the others are untouched
                assert_bridge_port(netns, nic.tap, bridge)

            # -- quit: QEMU runs the downscript of every tap still open
            assert vm.quit() == 0
        assert not vm.killed
        assert not vm.running()

        assert taps(netns) == []
        assert ports(netns, "br-a") == [] and ports(netns, "br-b") == []
        assert names_in(state, "nics") == []
        after = netns.snapshot()
        assert after == before, snapshot_diff(before, after)
        assert hook_errors(vm.log()) == [], vm.log()
    except BaseException:
        print("---- QEMU output (with the hooks' stderr) ----")
        print(vm.log())
        raise
    assert time.monotonic() - t0 < 30
