"""Ganeti KVM runtime files, written the way Ganeti writes them.

``GanetiKvm`` below replays what ``hv_kvm`` does on start, NIC hot-add, hot-remove,
hot-modify and soft reboot (file names, write order, ``json.dumps`` of the runtime
list, the kernel's lowest-free ``tapN`` names), with a controlled clock for file
modification times, so the tests can check the answer against the truth: which
NIC each tap really belongs to.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nichooks.callers.ganeti_runtime import find_tap, nic_env_for_tap

NET_UUID = "0d6e4e55-3a5c-4b8f-9b1e-6c2b1f0a9e77"
DEAD_PID = 2**22 + 7  # above any pid_max: never a running process

NETINFO = {
    "name": "pub1",
    "serial_no": 3,
    "mac_prefix": "aa:00:01",
    "network": "192.0.2.0/24",
    "network6": "2001:db8:1::/64",
    "gateway": "192.0.2.1",
    "gateway6": "2001:db8:1::1",
    "reservations": "1" + "0" * 254 + "1",
    "ext_reservations": "0" * 256,
    "ctime": 1700000000.25,
    "mtime": 1700000100.5,
    "uuid": NET_UUID,
    "tags": ["blue", "dmz"],
}


def nic_uuid(n: int) -> str:
    return f"{n:08x}-1111-4222-8333-{n:012x}"


def make_nic(n: int, **extra: Any) -> dict[str, Any]:
    """``objects.NIC.ToDict()``: only keys whose value is not None."""
    uuid = nic_uuid(n)
    nic: dict[str, Any] = {
        "mac": f"aa:00:00:00:00:{n:02x}",
        "uuid": uuid,
        "nicparams": {"mode": "bridged", "link": "br0", "vlan": ""},
        "hvinfo": {
            "driver": "virtio-net-pci",
            "id": "nic-" + uuid.rsplit("-", 2)[0],
            "bus": "pci.0",
            "addr": hex(12 + n),
        },
    }
    nic.update(extra)
    return nic


@dataclass
class GanetiKvm:
    """One node's ``kvm-hypervisor`` run files, changed as Ganeti changes them."""

    run_dir: Path
    instance: str = "web1.example.com"
    clock: int = 1_700_000_000 * 10**9
    config: list[dict[str, Any]] = field(default_factory=list)
    runtime: list[dict[str, Any]] = field(default_factory=list)
    live_taps: dict[str, str] = field(default_factory=dict)  # tap -> NIC uuid
    plug_seq: dict[str, int] = field(default_factory=dict)  # tap -> seq used by ifup
    shared_taps: set[str] = field(default_factory=set)  # taps held by other instances

    @property
    def nic_dir(self) -> Path:
        return self.run_dir / "kvm-hypervisor" / "nic" / self.instance

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "kvm-hypervisor" / "pid" / self.instance

    @property
    def runtime_file(self) -> Path:
        return self.run_dir / "kvm-hypervisor" / "conf" / f"{self.instance}.runtime"

    def tick(self, ns: int = 10**9) -> None:
        self.clock += ns

    def open_tap(self, uuid: str) -> str:
        """The kernel's choice: the lowest free ``tap%d``."""
        taken = set(self.live_taps) | self.shared_taps
        n = 0
        while f"tap{n}" in taken:
            n += 1
        tap = f"tap{n}"
        self.live_taps[tap] = uuid
        return tap

    def close_tap(self, uuid: str) -> None:
        for tap, owner in list(self.live_taps.items()):
            if owner == uuid:
                del self.live_taps[tap]
                del self.plug_seq[tap]

    def write_nic_file(self, seq: int, tap: str) -> None:
        self.nic_dir.mkdir(parents=True, exist_ok=True, mode=0o775)
        path = self.nic_dir / str(seq)
        path.write_bytes(tap.encode())  # no trailing newline, as OpenTap's name
        os.utime(path, ns=(self.clock, self.clock))

    def save_runtime(self) -> None:
        kvm_cmd = ["/usr/bin/kvm", "-name", self.instance, "-m", "1024", "-daemonize"]
        hvparams = {"nic_type": "paravirtual", "kvm_path": "/usr/bin/kvm", "vhost_net": False}
        disks = [[{"dev_type": "plain", "size": 1024, "uuid": "d1"}, "/dev/xenvg/d1", None]]
        self.runtime_file.parent.mkdir(parents=True, exist_ok=True)
        self.runtime_file.write_text(json.dumps([kvm_cmd, self.runtime, hvparams, disks]))

    # --- Ganeti operations ----------------------------------------------------

    def start(self, nics: list[dict[str, Any]], same_tick: bool = True) -> None:
        """StartInstance / AcceptInstance: taps opened and ifup run in runtime
        order, QEMU started, then every ``<seq>`` file written."""
        self.tick()
        if not self.config:
            self.config = copy.deepcopy(nics)
        self.runtime = copy.deepcopy(nics)
        self.save_runtime()
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(f"{os.getpid()}\n")  # a process that exists
        taps = []
        for seq, nic in enumerate(self.runtime):
            tap = self.open_tap(nic["uuid"])
            self.plug_seq[tap] = seq
            taps.append(tap)
        for seq, tap in enumerate(taps):
            if not same_tick:
                self.tick(1000)
            self.write_nic_file(seq, tap)

    def hot_add(self, nic: dict[str, Any]) -> str:
        """gnt-instance modify --net add --hotplug: seq = the new config index."""
        self.tick()
        self.config.append(copy.deepcopy(nic))
        seq = len(self.config) - 1
        tap = self.open_tap(nic["uuid"])
        self.plug_seq[tap] = seq
        self.write_nic_file(seq, tap)
        self.runtime.append(copy.deepcopy(nic))
        self.save_runtime()
        return tap

    def hot_del(self, index: int) -> None:
        """gnt-instance modify --net INDEX:remove --hotplug: removes file INDEX."""
        self.tick()
        nic = self.config.pop(index)
        (self.nic_dir / str(index)).unlink(missing_ok=True)
        self.close_tap(nic["uuid"])
        self.runtime = [n for n in self.runtime if n["uuid"] != nic["uuid"]]
        self.save_runtime()

    def hot_mod(self, index: int, **nicparams: str) -> str:
        """HotModDevice = HotDelDevice + HotAddDevice with the same seq: the NIC
        moves to the end of the runtime list, its file keeps its number."""
        self.tick()
        nic = self.config[index]
        nic["nicparams"] = {**nic["nicparams"], **nicparams}
        (self.nic_dir / str(index)).unlink(missing_ok=True)
        self.close_tap(nic["uuid"])
        self.runtime = [n for n in self.runtime if n["uuid"] != nic["uuid"]]
        tap = self.open_tap(nic["uuid"])
        self.plug_seq[tap] = index
        self.write_nic_file(index, tap)
        self.runtime.append(copy.deepcopy(nic))
        self.save_runtime()
        return tap

    def stop(self) -> None:
        """QEMU is gone (shutdown, crash) and Ganeti has not cleaned up yet: no
        taps, files still there, the pid file naming a dead process."""
        self.live_taps.clear()
        self.plug_seq.clear()
        self.pid_file.write_text(f"{DEAD_PID}\n")

    def soft_reboot(self) -> None:
        """RebootInstance: same runtime, new taps, files 0..n-1 rewritten; files
        with higher numbers are left where they were."""
        for uuid in [n["uuid"] for n in self.runtime]:
            self.close_tap(uuid)
        self.start(self.runtime)

    def owner(self, tap: str) -> tuple[str, int]:
        return self.live_taps[tap], self.plug_seq[tap]

    def env(self, tap: str, *others: GanetiKvm) -> dict[str, str] | None:
        """nic_env_for_tap with this node's taps as the existing devices."""
        live = set(self.live_taps).union(*(o.live_taps for o in others)) | self.shared_taps
        return nic_env_for_tap(self.run_dir, tap, link_exists=live.__contains__)


@pytest.fixture
def kvm(tmp_path: Path) -> GanetiKvm:
    return GanetiKvm(tmp_path / "ganeti")


def uuid_of(env: dict[str, str] | None) -> str | None:
    return None if env is None else env["INTERFACE_UUID"]


# --- the environment ------------------------------------------------------------


def test_env_exactly_as_configure_nic(kvm: GanetiKvm) -> None:
    kvm.start(
        [
            make_nic(0),
            make_nic(
                1,
                ip="192.0.2.10",
                name="front",
                network=NET_UUID,
                netinfo=NETINFO,
                nicparams={"mode": "routed", "link": "100", "vlan": ""},
            ),
            make_nic(
                2, name="trunk", nicparams={"mode": "openvswitch", "link": "br-int", "vlan": ".100:200"}
            ),
        ]
    )
    assert kvm.env("tap0") == {
        "INSTANCE": "web1.example.com",
        "MAC": "aa:00:00:00:00:00",
        "MODE": "bridged",
        "INTERFACE": "tap0",
        "INTERFACE_INDEX": "0",
        "INTERFACE_UUID": nic_uuid(0),
        "LINK": "br0",
        "VLAN": "",
        "BRIDGE": "br0",
    }
    assert kvm.env("tap1") == {
        "INSTANCE": "web1.example.com",
        "MAC": "aa:00:00:00:00:01",
        "MODE": "routed",
        "INTERFACE": "tap1",
        "INTERFACE_INDEX": "1",
        "INTERFACE_UUID": nic_uuid(1),
        "IP": "192.0.2.10",
        "INTERFACE_NAME": "front",
        "LINK": "100",
        "VLAN": "",
        "NETWORK_NAME": "pub1",
        "NETWORK_UUID": NET_UUID,
        "NETWORK_TAGS": "blue dmz",
        "NETWORK_SUBNET": "192.0.2.0/24",
        "NETWORK_GATEWAY": "192.0.2.1",
        "NETWORK_SUBNET6": "2001:db8:1::/64",
        "NETWORK_GATEWAY6": "2001:db8:1::1",
        "NETWORK_MAC_PREFIX": "aa:00:01",
    }
    assert kvm.env("tap2") == {
        "INSTANCE": "web1.example.com",
        "MAC": "aa:00:00:00:00:02",
        "MODE": "openvswitch",
        "INTERFACE": "tap2",
        "INTERFACE_INDEX": "2",
        "INTERFACE_UUID": nic_uuid(2),
        "INTERFACE_NAME": "trunk",
        "LINK": "br-int",
        "VLAN": ".100:200",
    }


def test_optional_keys(kvm: GanetiKvm) -> None:
    minimal_net = {"name": "n", "uuid": NET_UUID, "network": "10.0.0.0/8", "gateway": None}
    kvm.start(
        [
            # routed in the main table: no LINK; runtime older than the vlan nicparam
            make_nic(0, ip="10.0.0.5", nicparams={"mode": "routed", "link": ""}),
            # bridged needs a LINK, but BRIDGE follows it blindly, as Ganeti does
            make_nic(1, nicparams={"mode": "bridged", "link": "", "vlan": ".7"}),
            make_nic(2, network=NET_UUID, netinfo=minimal_net),
            make_nic(3, network=NET_UUID),  # netinfo missing: Ganeti could not have run
        ]
    )
    env0 = kvm.env("tap0")
    assert env0 is not None
    assert "LINK" not in env0 and "VLAN" not in env0 and "BRIDGE" not in env0
    assert env0["IP"] == "10.0.0.5"
    env1 = kvm.env("tap1")
    assert env1 is not None
    assert env1["BRIDGE"] == "" and "LINK" not in env1 and env1["VLAN"] == ".7"
    env2 = kvm.env("tap2")
    assert env2 is not None
    assert {k: v for k, v in env2.items() if k.startswith("NETWORK_")} == {
        "NETWORK_NAME": "n",
        "NETWORK_UUID": NET_UUID,
        "NETWORK_TAGS": "",
        "NETWORK_SUBNET": "10.0.0.0/8",
    }
    env3 = kvm.env("tap3")
    assert env3 is not None and not any(k.startswith("NETWORK_") for k in env3)
    for env in (env0, env1, env2, env3):
        assert "TAGS" not in env and "PATH" not in env


def test_three_item_runtime_of_old_ganeti(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0)])
    cmd, nics, hvparams, _ = json.loads(kvm.runtime_file.read_text())
    kvm.runtime_file.write_text(json.dumps([cmd, nics, hvparams]))
    assert uuid_of(kvm.env("tap0")) == nic_uuid(0)


def test_find_tap(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0), make_nic(1)])
    other = GanetiKvm(kvm.run_dir, instance="db1.example.com", shared_taps={"tap0", "tap1"})
    other.start([make_nic(5)])
    assert find_tap(kvm.run_dir, "tap1") == [("web1.example.com", 1)]
    assert find_tap(kvm.run_dir, "tap2") == [("db1.example.com", 0)]
    assert find_tap(kvm.run_dir, "tap9") == []
    # a leftover directory of a crashed instance naming the same tap
    stale = kvm.run_dir / "kvm-hypervisor" / "nic" / "old.example.com"
    stale.mkdir()
    (stale / "3").write_bytes(b"tap1")
    assert find_tap(kvm.run_dir, "tap1") == [("old.example.com", 3), ("web1.example.com", 1)]


@pytest.mark.parametrize("tap", ["", ".", "..", "../tap0", "a/b", "tap0 ", "tap:0", "x" * 16])
def test_not_an_interface_name(kvm: GanetiKvm, tap: str) -> None:
    kvm.start([make_nic(0)])
    assert find_tap(kvm.run_dir, tap) == []
    assert kvm.env(tap) is None


def test_no_run_dir(tmp_path: Path) -> None:
    assert find_tap(tmp_path / "nothing", "tap0") == []
    assert nic_env_for_tap(tmp_path / "nothing", "tap0") is None


# --- index drift ------------------------------------------------------------------


def test_hot_remove_shifts_positions(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0), make_nic(1), make_nic(2)])
    kvm.hot_del(1)
    # runtime is [nic0, nic2] but nic2's file is still called 2
    env = kvm.env("tap2")
    assert env is not None
    assert (env["INTERFACE_UUID"], env["INTERFACE_INDEX"]) == (nic_uuid(2), "2")
    assert uuid_of(kvm.env("tap0")) == nic_uuid(0)
    assert kvm.env("tap1") is None  # gone with its NIC


def test_hot_modify_moves_the_nic_to_the_end(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0), make_nic(1), make_nic(2)])
    tap = kvm.hot_mod(0, link="br1")
    runtime_nics = json.loads(kvm.runtime_file.read_text())[1]
    assert runtime_nics[0]["uuid"] == nic_uuid(1)  # what nics[seq] would answer
    env = kvm.env(tap)
    assert env is not None
    assert (env["INTERFACE_UUID"], env["INTERFACE_INDEX"], env["LINK"]) == (nic_uuid(0), "0", "br1")
    for other in ("tap1", "tap2"):
        assert uuid_of(kvm.env(other)) == kvm.live_taps[other]


def test_hot_add_after_removing_the_last(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0), make_nic(1)])
    kvm.hot_del(1)
    tap = kvm.hot_add(make_nic(7))
    env = kvm.env(tap)
    assert env is not None and (env["INTERFACE_UUID"], env["INTERFACE_INDEX"]) == (nic_uuid(7), "1")


def test_overwriting_hot_add_gives_no_answer_rather_than_a_wrong_one(kvm: GanetiKvm) -> None:
    """Ganeti's runtime-file drift: the hot-add writes ``<len(NICs)>``, the file of a
    running NIC. After one more hot-remove, ``nics[seq]`` names the wrong NIC."""
    kvm.start([make_nic(0), make_nic(1), make_nic(2), make_nic(3)])
    kvm.hot_del(1)  # files 0 2 3, runtime 0 2 3
    kvm.hot_add(make_nic(4))  # writes file 3 over nic3's tap; runtime 0 2 3 4
    kvm.hot_del(3)  # config index 3 is nic4: file 3 removed; runtime 0 2 3
    runtime_nics = json.loads(kvm.runtime_file.read_text())[1]
    assert runtime_nics[2]["uuid"] == nic_uuid(3)  # nics[2] is not tap2's NIC
    assert kvm.live_taps["tap2"] == nic_uuid(2)
    assert kvm.env("tap2") is None
    assert kvm.env("tap3") is None  # nic3 lost its file


def test_soft_reboot_leaves_old_files(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0), make_nic(1), make_nic(2)])
    kvm.hot_del(0)  # files 1 2, runtime nic1 nic2
    kvm.soft_reboot()  # files 0 1 rewritten, file 2 left over
    assert sorted(p.name for p in kvm.nic_dir.iterdir()) == ["0", "1", "2"]
    for tap in kvm.live_taps:
        env = kvm.env(tap)
        assert env is not None
        assert (env["INTERFACE_UUID"], int(env["INTERFACE_INDEX"])) == kvm.owner(tap)
    (kvm.nic_dir / "2").write_bytes(b"tap9")
    os.utime(kvm.nic_dir / "2", ns=(1, 1))
    assert kvm.env("tap9") is None


def test_migration_target(kvm: GanetiKvm) -> None:
    """The target runs the source's runtime: files follow its (drifted) order."""
    kvm.start([make_nic(0), make_nic(1), make_nic(2)])
    kvm.hot_mod(0, vlan=".5")
    source_runtime = kvm.runtime
    target = GanetiKvm(kvm.run_dir.parent / "target", instance=kvm.instance)
    target.config = kvm.config
    target.start(source_runtime, same_tick=False)
    for tap in target.live_taps:
        env = target.env(tap)
        assert env is not None
        assert (env["INTERFACE_UUID"], int(env["INTERFACE_INDEX"])) == target.owner(tap)


# --- replaying Ganeti ----------------------------------------------------------------


def replay(kvm: GanetiKvm, ops: list[tuple[str, int]]) -> None:
    next_nic = len(kvm.config)
    for op, arg in ops:
        if op == "add":
            kvm.hot_add(make_nic(next_nic))
            next_nic += 1
        elif op == "del-last" and kvm.config:
            kvm.hot_del(len(kvm.config) - 1)
        elif op == "del" and kvm.config:
            kvm.hot_del(arg % len(kvm.config))
        elif op == "mod" and kvm.config:
            kvm.hot_mod(arg % len(kvm.config), link=f"br{arg}")
        elif op == "restart":  # hard reboot: Ganeti removes the nic directory
            for uuid in [n["uuid"] for n in kvm.runtime]:
                kvm.close_tap(uuid)
            for path in kvm.nic_dir.iterdir():
                path.unlink()
            kvm.start(kvm.config)
        elif op == "reboot":
            kvm.soft_reboot()


def stale_taps(kvm: GanetiKvm) -> set[str]:
    return {p.read_text() for p in kvm.nic_dir.iterdir()} - set(kvm.live_taps)


simple_ops = st.lists(
    st.tuples(st.sampled_from(["add", "mod", "del-last", "restart"]), st.integers(0, 7)), max_size=6
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    initial=st.integers(1, 4),
    ops=simple_ops,
    remove_at=st.integers(0, 6),
    remove=st.none() | st.integers(0, 7),
    same_tick=st.booleans(),
)
def test_right_nic_without_ambiguous_drift(
    tmp_path: Path,
    initial: int,
    ops: list[tuple[str, int]],
    remove_at: int,
    remove: int | None,
    same_tick: bool,
) -> None:
    """Hot-adds, hot-modifies, hard reboots and hot-removes of the last NIC:
    while the instance runs, every tap gets its own NIC. With one hot-remove
    anywhere (the runtime-file drift), some taps may get no answer but none
    a wrong one. Stale files always get None; after a stop, no answer is wrong."""
    kvm = GanetiKvm(tmp_path / f"h{len(list(tmp_path.iterdir()))}")
    kvm.start([make_nic(n) for n in range(initial)], same_tick=same_tick)
    if remove is not None:
        ops = [*ops[:remove_at], ("del", remove), *ops[remove_at:]]
    replay(kvm, ops)
    for tap in kvm.live_taps:
        env = kvm.env(tap)
        if env is None:
            assert remove is not None, f"{tap} not found"
            continue
        assert (env["INTERFACE_UUID"], int(env["INTERFACE_INDEX"])) == kvm.owner(tap)
        assert (env["INTERFACE"], env["INSTANCE"]) == (tap, kvm.instance)
    for tap in stale_taps(kvm):
        assert kvm.env(tap) is None
    truth = {tap: kvm.owner(tap) for tap in kvm.live_taps}
    kvm.stop()
    for tap in set(truth) | stale_taps(kvm):
        env = kvm.env(tap)
        if env is not None:
            assert (env["INTERFACE_UUID"], int(env["INTERFACE_INDEX"])) == truth[tap]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    initial=st.integers(1, 4),
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "del", "mod", "reboot", "restart"]), st.integers(0, 7)),
        max_size=8,
    ),
)
def test_any_history(tmp_path: Path, initial: int, ops: list[tuple[str, int]]) -> None:
    """Whatever Ganeti did: no exception, a vanished tap of a running instance
    is never attributed to a NIC, and answers describe the tap asked about."""
    kvm = GanetiKvm(tmp_path / f"h{len(list(tmp_path.iterdir()))}")
    kvm.start([make_nic(n) for n in range(initial)])
    replay(kvm, ops)
    runtime_uuids = {n["uuid"] for n in kvm.runtime}
    for tap in stale_taps(kvm):
        assert kvm.env(tap) is None
    for tap in kvm.live_taps:
        env = kvm.env(tap)
        if env is not None:
            assert env["INTERFACE"] == tap and env["INTERFACE_UUID"] in runtime_uuids


def test_vanished_tap_of_a_running_instance(kvm: GanetiKvm) -> None:
    """A tap that is gone while its instance runs was hot-removed or re-plugged:
    whatever file still names it is stale."""
    kvm.start([make_nic(0), make_nic(1)])
    kvm.live_taps.pop("tap1")  # gone, yet its file and runtime entry are intact
    assert kvm.env("tap1") is None
    kvm.live_taps.clear()  # no tap left, but the pid file names a live QEMU
    assert kvm.env("tap1") is None


def test_after_shutdown(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0), make_nic(1), make_nic(2)])
    kvm.hot_del(2)
    kvm.stop()
    for seq in (0, 1):
        env = kvm.env(f"tap{seq}")
        assert env is not None and (env["INTERFACE_UUID"], env["INTERFACE_INDEX"]) == (
            nic_uuid(seq),
            str(seq),
        )


def test_after_shutdown_only_a_start_layout_is_trusted(kvm: GanetiKvm) -> None:
    """With no taps left to tell stale files from current ones, a hot-modify's
    reordering is one drift too many."""
    kvm.start([make_nic(0), make_nic(1)])
    kvm.hot_mod(0, link="br7")
    assert kvm.env("tap0") is not None
    kvm.stop()
    assert kvm.env("tap0") is None and kvm.env("tap1") is None


def test_default_device_check_reads_sysfs(kvm: GanetiKvm) -> None:
    """Without ``link_exists``, /sys/class/net decides: ``lo`` always exists."""
    kvm.start([make_nic(0)])
    (kvm.nic_dir / "0").write_bytes(b"lo")
    env = nic_env_for_tap(kvm.run_dir, "lo")
    assert env is not None and env["INTERFACE_UUID"] == nic_uuid(0)


# --- safer matches: files named after the NIC UUID ---------------------------------


def test_uuid_file_wins_over_positions(kvm: GanetiKvm) -> None:
    """GRNET's ifdown patches also write ``nic/<instance>/<nic-uuid>``."""
    kvm.start([make_nic(0), make_nic(1), make_nic(2), make_nic(3)])
    kvm.hot_del(1)
    kvm.hot_add(make_nic(4))  # drift: file 3 now names nic4's tap
    for tap, uuid in kvm.live_taps.items():
        (kvm.nic_dir / uuid).write_bytes(tap.encode())
    env = kvm.env("tap2")
    assert env is not None and env["INTERFACE_UUID"] == nic_uuid(2) and env["INTERFACE_INDEX"] == "2"
    env = kvm.env("tap3")  # nic3's tap: only its uuid file names it
    assert env is not None and env["INTERFACE_UUID"] == nic_uuid(3) and "INTERFACE_INDEX" not in env


def test_seq_symlink_to_uuid_file(kvm: GanetiKvm) -> None:
    """Ganeti's ifdown design: the ``<seq>`` file becomes a symlink to the UUID file."""
    kvm.start([make_nic(0), make_nic(1)])
    for seq, tap in ((0, "tap0"), (1, "tap1")):
        uuid = kvm.live_taps[tap]
        (kvm.nic_dir / uuid).write_bytes(tap.encode())
        (kvm.nic_dir / str(seq)).unlink()
        target = uuid if seq == 0 else str(kvm.nic_dir / uuid)  # relative and absolute
        (kvm.nic_dir / str(seq)).symlink_to(target)
    assert find_tap(kvm.run_dir, "tap1") == [("web1.example.com", 1)]
    env = kvm.env("tap1")
    assert env is not None and env["INTERFACE_UUID"] == nic_uuid(1) and env["INTERFACE_INDEX"] == "1"


def test_stale_uuid_file_is_ignored(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0)])
    (kvm.nic_dir / nic_uuid(9)).write_bytes(b"tap0")  # a NIC no longer in the runtime
    assert uuid_of(kvm.env("tap0")) == nic_uuid(0)


# --- several instances naming one tap ----------------------------------------------


def test_newest_claim_wins(kvm: GanetiKvm) -> None:
    old = GanetiKvm(kvm.run_dir, instance="crashed.example.com")
    old.start([make_nic(8)])  # its directory was never cleaned up
    kvm.clock = old.clock
    kvm.start([make_nic(0)])  # the kernel gave tap0 again
    assert len(find_tap(kvm.run_dir, "tap0")) == 2
    env = kvm.env("tap0")
    assert env is not None and (env["INSTANCE"], env["INTERFACE_UUID"]) == (kvm.instance, nic_uuid(0))


def test_tied_claims_give_no_answer(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0)])
    twin = GanetiKvm(kvm.run_dir, instance="twin.example.com", clock=kvm.clock - 10**9)
    twin.start([make_nic(1)])
    assert kvm.env("tap0") is None


# --- untrusted files ---------------------------------------------------------------


GARBAGE_RUNTIMES: list[bytes] = [
    b"",
    b"not json",
    b"\xff\xfe garbage",
    b"{}",
    b"[]",
    b'[["kvm"]]',
    b'[["kvm"], {"mac": "x"}, {}]',
    b'[["kvm"], [1], {}]',
    b'[["kvm"], [null], {}]',
    b"[" * 100000 + b"]" * 100000,
    b'[["kvm"], [' + b"9" * 5000 + b"], {}]",
    json.dumps([[], [{"uuid": nic_uuid(0), "nicparams": {"mode": "bridged"}}], {}]).encode(),  # no mac
    json.dumps([[], [{**make_nic(0), "mac": 5}], {}]).encode(),
    json.dumps([[], [{**make_nic(0), "nicparams": None}], {}]).encode(),
    json.dumps([[], [{**make_nic(0), "nicparams": {"mode": 1, "link": "br0"}}], {}]).encode(),
    json.dumps([[], [{**make_nic(0), "nicparams": {"mode": "bridged", "link": ["br0"]}}], {}]).encode(),
    json.dumps([[], [{**make_nic(0), "ip": 10}], {}]).encode(),
    json.dumps([[], [{**make_nic(0), "uuid": ["x"]}], {}]).encode(),
    json.dumps([[], [{**make_nic(0), "network": NET_UUID, "netinfo": []}], {}]).encode(),
    json.dumps(
        [[], [{**make_nic(0), "network": NET_UUID, "netinfo": {**NETINFO, "tags": "a"}}], {}]
    ).encode(),
    json.dumps([[], [{**make_nic(0), "network": NET_UUID, "netinfo": {**NETINFO, "name": 3}}], {}]).encode(),
]


@pytest.mark.parametrize("content", GARBAGE_RUNTIMES, ids=range(len(GARBAGE_RUNTIMES)))
def test_garbage_runtime_gives_none(kvm: GanetiKvm, content: bytes) -> None:
    kvm.start([make_nic(0)])
    kvm.runtime_file.write_bytes(content)
    assert kvm.env("tap0") is None
    assert find_tap(kvm.run_dir, "tap0") == [("web1.example.com", 0)]  # the nic file is fine


def test_unreadable_runtime(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0)])
    kvm.runtime_file.unlink()
    assert kvm.env("tap0") is None
    kvm.runtime_file.mkdir()
    assert kvm.env("tap0") is None


def test_oversized_runtime(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0)])
    with kvm.runtime_file.open("r+b") as f:
        f.truncate(17 * 1024 * 1024)  # sparse: cheap to make, too big to read
    assert kvm.env("tap0") is None


def test_runtime_symlink_not_followed(kvm: GanetiKvm, tmp_path: Path) -> None:
    kvm.start([make_nic(0)])
    elsewhere = tmp_path / "elsewhere.runtime"
    kvm.runtime_file.rename(elsewhere)
    kvm.runtime_file.symlink_to(elsewhere)
    assert kvm.env("tap0") is None


def test_odd_nic_files_are_skipped(kvm: GanetiKvm, tmp_path: Path) -> None:
    kvm.start([make_nic(0), make_nic(1)])
    outside = tmp_path / "outside"
    outside.write_bytes(b"tap7")
    os.mkfifo(kvm.nic_dir / "5")  # would block a reader
    (kvm.nic_dir / "6").symlink_to(outside)  # leads out of the directory
    (kvm.nic_dir / "7").write_bytes(b"tap8" + b" " * 300)  # too long for a tap file
    (kvm.nic_dir / "8").write_bytes(b"tap 9")  # not an interface name
    (kvm.nic_dir / "09").write_bytes(b"tap10")  # Ganeti never writes "09"
    (kvm.nic_dir / "notes").write_bytes(b"tap11")
    (kvm.nic_dir / "10").mkdir()
    for tap in ("tap7", "tap8", "tap 9", "tap10", "tap11"):
        assert find_tap(kvm.run_dir, tap) == []
    # the junk did not make the real files ambiguous
    assert uuid_of(kvm.env("tap1")) == nic_uuid(1)


def test_trailing_newline_tolerated(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0)])
    stamp = (kvm.nic_dir / "0").stat().st_mtime_ns
    (kvm.nic_dir / "0").write_bytes(b"tap0\n")
    os.utime(kvm.nic_dir / "0", ns=(stamp, stamp))
    assert uuid_of(kvm.env("tap0")) == nic_uuid(0)


def test_instance_directories_cannot_lead_elsewhere(kvm: GanetiKvm, tmp_path: Path) -> None:
    kvm.start([make_nic(0)])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "0").write_bytes(b"tap5")
    nic_root = kvm.run_dir / "kvm-hypervisor" / "nic"
    (nic_root / "evil.example.com").symlink_to(foreign)
    conf = kvm.run_dir / "kvm-hypervisor" / "conf"
    (conf / "evil.example.com.runtime").write_text(json.dumps([[], [make_nic(5)], {}]))
    assert find_tap(kvm.run_dir, "tap5") == []
    assert kvm.env("tap5") is None
    (nic_root / "stray-file").write_bytes(b"tap0")
    assert find_tap(kvm.run_dir, "tap0") == [("web1.example.com", 0)]


def test_unreadable_nic_dir(kvm: GanetiKvm) -> None:
    kvm.start([make_nic(0)])
    nic_root = kvm.run_dir / "kvm-hypervisor" / "nic"
    nic_root.rename(nic_root.with_name("moved"))
    nic_root.write_bytes(b"")  # a file where the directory should be
    assert find_tap(kvm.run_dir, "tap0") == []
    assert kvm.env("tap0") is None
