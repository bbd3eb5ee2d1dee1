"""vif-ganeti end to end, as libxl calls it: the vif is a veth named `vif5.0` in a
test namespace (its peer in a guest namespace), xenstore and `xl` are stand-ins on
PATH backed by a directory, the NIC file is written exactly as Ganeti writes it."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hooks import FAULT_SEAM, bin_path, one_line
from tests.support.netns import Netns, require_root
from tests.support.scripts import write_script
from tests.support.state import journals, names_in, tap_index

STANDINS = Path(__file__).with_name("xen_standins")
UUID = "9d1c3b2a-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
MAC = "aa:00:00:35:11:22"
# The vif's own MAC and MTU, and the bridge's MTU, all differ from what a plug sets
# and from any kernel default: a plug visibly changes each, and an undo that restored
# a default (or nothing) rather than the old value shows.
VIF_MAC = "02:5e:00:00:05:00"
VIF_MTU = 1400
BRIDGE_MTU = 9000


@dataclass
class Dom0:
    host: Netns
    guest: Netns
    root: Path

    @property
    def xs(self) -> Path:
        return self.root / "xenstore"

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": f"{STANDINS}:/usr/sbin:/usr/bin:/sbin:/bin", "XENSTORE_DIR": str(self.xs),
               "NICHOOKS_STATE_DIR": str(self.root / "state"),
               "NICHOOKS_CONF_DIR": str(self.root / "conf"),
               "GANETI_RUN_DIR": str(self.root / "ganeti"), "script": "/etc/xen/scripts/vif-ganeti",
               "XENBUS_TYPE": "vif", "XENBUS_PATH": "backend/vif/5/0",
               "XENBUS_BASE_PATH": "backend", "netdev": "", "vif": "vif5.0",
               "PYTHONPATH": str(FAULT_SEAM)}
        env.update(extra)
        return env

    def xs_write(self, key: str, value: str) -> None:
        path = self.xs / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)

    def xs_read(self, key: str) -> str | None:
        path = self.xs / key
        return path.read_text() if path.exists() else None

    def nic_file(self, instance: str, index: int, text: str) -> None:
        path = self.root / "ganeti" / "xen-hypervisor" / "nic" / instance / str(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def vif(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.host.run(bin_path("vif-ganeti"), *args, env=self.env(**extra), check=False)

    def master(self, dev: str) -> str | None:
        return self.host.link(dev).get("master")

    def journaled(self) -> tuple[list[str], dict[str, str]]:
        """The keys of the journals (`nics/`) and the tap index (`taps/`, tap -> key)."""
        state = self.root / "state"
        return [j["key"] for j in journals(state)], tap_index(state)

    def vif_state(self, dev: str = "vif5.0") -> tuple[str, int, bool, str | None]:
        """(MAC, MTU, up, master) of a device, as `ip -j` reports them."""
        link = self.host.link(dev)
        return link["address"], link["mtu"], "UP" in link["flags"], link.get("master")


# Exactly as hv_xen.py's _WriteNICInfoFile writes it.
NIC_FILE = f"""TAGS="web\\ prod"
NETWORK_NAME="net1"
MAC={MAC}
IP=192.0.2.5
INTERFACE_INDEX=0
INTERFACE_UUID={UUID}
MODE=bridged
LINK=br0
VLAN=
"""


@pytest.fixture
def dom0(tmp_path: Path) -> Iterator[Dom0]:
    require_root()
    host, guest = Netns(), Netns()
    try:
        d = Dom0(host, guest, tmp_path)
        (tmp_path / "state").mkdir()
        (tmp_path / "conf").mkdir()
        host.ip("link", "add", "br0", "type", "bridge")
        # Set after creation, as an operator would: only then does the kernel keep them
        # (see bridged_env.Site.add_bridge).
        host.ip("link", "set", "br0", "mtu", str(BRIDGE_MTU))
        host.ip("link", "set", "br0", "address", "02:00:00:00:00:01", "up")
        host.ip("link", "add", "vif5.0", "type", "veth", "peer", "name", "eth0", "netns", guest.name)
        # Down, as netback creates it, with a MAC and MTU of its own.
        host.ip("link", "set", "vif5.0", "address", VIF_MAC, "mtu", str(VIF_MTU))
        guest.ip("link", "set", "eth0", "address", MAC, "up")
        d.xs_write(".xl/domname/5", "inst1.example.org")
        d.xs_write("backend/vif/5/0/mac", MAC)
        yield d
    finally:
        guest.delete()
        host.delete()


def test_online_plugs_and_reports_connected_offline_unplugs(dom0: Dom0) -> None:
    """Online changes the vif's MAC, MTU, master and up state; offline puts back every
    one of them (the namespace as it was) and leaves no journal or tap index entry."""
    dom0.nic_file("inst1.example.org", 0, NIC_FILE)
    write_script(dom0.root / "conf" / "ifup.d", "10-record",
                 f'echo "$INSTANCE|$TAGS|$INTERFACE|$INTERFACE_UUID" > {dom0.root}/seen')
    before = dom0.host.snapshot()
    assert dom0.vif_state() == (VIF_MAC, VIF_MTU, False, None)
    r = dom0.vif("online", "type_if=vif")
    assert r.returncode == 0, r.stderr
    # fe + the vif's own MAC without its first octet, the bridge's MTU, enslaved, up
    assert dom0.vif_state() == ("fe" + VIF_MAC[2:], BRIDGE_MTU, True, "br0")
    assert dom0.xs_read("backend/vif/5/0/hotplug-status") == "connected"
    assert (dom0.root / "seen").read_text().strip() == f"inst1.example.org|web prod|vif5.0|{UUID}"
    assert dom0.journaled() == ([UUID], {"vif5.0": UUID})

    r = dom0.vif("offline", "type_if=vif")
    assert r.returncode == 0, r.stderr
    assert dom0.vif_state() == (VIF_MAC, VIF_MTU, False, None)
    assert dom0.host.snapshot() == before
    assert dom0.journaled() == ([], {})


def test_commands_for_the_other_device_type_do_nothing(dom0: Dom0) -> None:
    dom0.nic_file("inst1.example.org", 0, NIC_FILE)
    for args in (("online", "type_if=tap"), ("add", "type_if=vif"), ("add",)):
        r = dom0.vif(*args)
        assert r.returncode == 0, r.stderr
    assert dom0.master("vif5.0") is None
    assert dom0.xs_read("backend/vif/5/0/hotplug-status") is None


def test_vifname_renames_before_plugging(dom0: Dom0) -> None:
    dom0.nic_file("inst1.example.org", 0, NIC_FILE)
    dom0.xs_write("backend/vif/5/0/vifname", "web0")
    r = dom0.vif("online", "type_if=vif")
    assert r.returncode == 0, r.stderr
    assert not dom0.host.has_link("vif5.0")
    assert dom0.master("web0") == "br0"
    r = dom0.vif("offline", "type_if=vif")
    assert r.returncode == 0, r.stderr
    assert dom0.master("web0") is None


def test_failure_writes_hotplug_error_and_leaves_nothing(dom0: Dom0) -> None:
    """Refused in preflight (LINK does not exist): nothing in the namespace changes,
    no journal or tap index entry stays, and libxl is told why."""
    dom0.nic_file("inst1.example.org", 0, NIC_FILE.replace("LINK=br0", "LINK=br9"))
    before = dom0.host.snapshot()
    r = dom0.vif("online", "type_if=vif")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "LINK br9: no such device" in line
    assert dom0.xs_read("backend/vif/5/0/hotplug-status") == "error"
    assert "LINK br9: no such device" in (dom0.xs_read("backend/vif/5/0/hotplug-error") or "")
    assert dom0.host.snapshot() == before
    assert dom0.journaled() == ([], {})


# The bridged plan without a VLAN: 1 MAC, 2 MTU, 3 master, 4 up.
PLAN_STEPS = ["set vif5.0 MAC to fe" + VIF_MAC[2:], f"set vif5.0 MTU to {BRIDGE_MTU}",
              "sysctl net.ipv6.conf.vif5/0.disable_ipv6=1",
              f"filter vif5.0 in nftables bridge nichooks (on: MAC {MAC}, sources 192.0.2.5"
              " fe80::a800:ff:fe35:1122)",
              "attach vif5.0 to bridge br0", "set root_block on bridge port vif5.0",
              "bring vif5.0 up"]


@pytest.mark.parametrize("failing", [2, 4, 6, 7])
def test_failure_after_changes_rolls_back_to_the_namespace_as_it_was(dom0: Dom0,
                                                                     failing: int) -> None:
    """A step fails after the steps before it changed the vif (NICHOOKS_TEST_FAULT in
    libxl's environment): every change is undone, the journal and the tap index entry
    go, and hotplug-status/hotplug-error say which step failed and why."""
    dom0.nic_file("inst1.example.org", 0, NIC_FILE)
    before = dom0.host.snapshot()
    r = dom0.vif("-v", "online", "type_if=vif", NICHOOKS_TEST_FAULT=f"fail-at:{failing}")
    assert r.returncode == 1, r.stderr
    # The steps before the failing one were applied, then undone, newest first.
    applied = [m.group(1) for m in re.finditer(r'event=step step="([^"]*)" result=ok', r.stderr)]
    assert applied == PLAN_STEPS[:failing - 1]
    undone = [m.group(1) for m in re.finditer(r'event=undo step="([^"]*)" result=ok', r.stderr)]
    assert undone == PLAN_STEPS[:failing][::-1]
    cause = f"step {PLAN_STEPS[failing - 1]}: injected fault (NICHOOKS_TEST_FAULT)"
    last = r.stderr.splitlines()[-1]
    assert last.startswith("nichooks: ") and cause in last
    assert dom0.host.snapshot() == before
    assert dom0.journaled() == ([], {})
    assert dom0.xs_read("backend/vif/5/0/hotplug-status") == "error"
    assert cause in (dom0.xs_read("backend/vif/5/0/hotplug-error") or "")


def test_failing_ifup_script_rolls_back_the_whole_plug(dom0: Dom0) -> None:
    """An ifup.d script that fails runs after the whole built-in plug (it sees the vif
    enslaved, at the bridge's MTU, up): the plug is rolled back to the namespace as it
    was, and libxl learns that the script failed and what it said."""
    dom0.nic_file("inst1.example.org", 0, NIC_FILE)
    script = write_script(dom0.root / "conf" / "ifup.d", "50-refuse",
                          "d=/sys/class/net/$INTERFACE\n"
                          "echo \"$(cat $d/address) $(cat $d/mtu) $(cat $d/flags) "
                          f"$(readlink $d/master)\" > {dom0.root}/seen\n"
                          "echo 'no port for this tenant'\nexit 1")
    before = dom0.host.snapshot()
    r = dom0.vif("online", "type_if=vif")
    assert r.returncode == 1, r.stderr
    mac, mtu, flags, master = (dom0.root / "seen").read_text().split()
    assert (mac, mtu, master.rsplit("/", 1)[-1]) == ("fe" + VIF_MAC[2:], str(BRIDGE_MTU), "br0")
    assert int(flags, 16) & 0x1  # IFF_UP
    cause = f"{script} exited with status 1: no port for this tenant"
    assert cause in one_line(r.stderr)
    assert dom0.host.snapshot() == before
    assert dom0.journaled() == ([], {})
    assert dom0.xs_read("backend/vif/5/0/hotplug-status") == "error"
    assert cause in (dom0.xs_read("backend/vif/5/0/hotplug-error") or "")


def test_hvm_emulated_tap_is_a_second_device_of_the_nic(dom0: Dom0) -> None:
    dom0.nic_file("inst1.example.org", 0, NIC_FILE)
    dom0.host.ip("link", "add", "vif5.0-emu", "type", "veth", "peer", "name", "emu-peer")
    assert dom0.vif("online", "type_if=vif").returncode == 0
    r = dom0.vif("add", "type_if=tap", INTERFACE="vif5.0-emu")
    assert r.returncode == 0, r.stderr
    assert dom0.master("vif5.0") == dom0.master("vif5.0-emu") == "br0"
    assert [j["key"] for j in journals(dom0.root / "state")] == [f"{UUID}-emu", UUID]
    # the guest's PV driver took over: the emulated tap goes, the vif stays
    r = dom0.vif("remove", "type_if=tap", INTERFACE="vif5.0-emu")
    assert r.returncode == 0, r.stderr
    assert dom0.master("vif5.0-emu") is None
    assert dom0.master("vif5.0") == "br0"
    assert dom0.vif("offline", "type_if=vif").returncode == 0
    assert names_in(dom0.root / "state", "nics") == []


def test_missing_nic_file_falls_back_to_xenstore_and_says_so(dom0: Dom0) -> None:
    dom0.xs_write(".xl/domname/5", "inst1.example.org--incoming")
    dom0.xs_write("backend/vif/5/0/bridge", "br0")
    dom0.xs_write("backend/vif/5/0/ip", "192.0.2.5")
    r = dom0.vif("-v", "online", "type_if=vif")
    assert r.returncode == 0, r.stderr
    assert "no NIC file" in r.stderr and "source=xenstore" in r.stderr
    assert dom0.master("vif5.0") == "br0"
    assert dom0.xs_read("backend/vif/5/0/hotplug-status") == "connected"
    assert dom0.vif("offline", "type_if=vif").returncode == 0
    assert dom0.master("vif5.0") is None


def test_bad_invocations_exit_2(dom0: Dom0) -> None:
    r = dom0.vif("frobnicate")
    assert r.returncode == 2
    assert "command" in one_line(r.stderr)
    r = dom0.vif("online", "type_if=vif", vif="eth0")
    assert r.returncode == 2
    assert "vif" in one_line(r.stderr)


def test_standins_are_executable() -> None:
    for tool in ("xenstore-read", "xenstore-write", "xl"):
        assert os.stat(STANDINS / tool).st_mode & stat.S_IXUSR


def test_nic_file_cannot_set_settings_or_the_scripts_environment(dom0: Dom0) -> None:
    """Ganeti writes INTERFACE_NAME unquoted: a tenant's NIC name becomes more
    assignments. None of them may reach our settings or root's scripts."""
    evil = dom0.root / "evil"
    marker = dom0.root / "evil-ran"
    write_script(evil / "ifup.d", "10-evil", f"touch {marker}")
    write_script(dom0.root / "conf" / "ifup.d", "10-record",
                 'echo "${LD_PRELOAD-unset}|$NICHOOKS_CONF_DIR|'
                 f'$NICHOOKS_STATE_DIR|$INTERFACE_NAME" > {dom0.root}/seen')
    dom0.nic_file("inst1.example.org", 0, NIC_FILE + (
        f"INTERFACE_NAME=eth0 NICHOOKS_CONF_DIR={evil} LD_PRELOAD=/nonexistent/evil.so "
        f"NICHOOKS_STATE_DIR={dom0.root}/evil-state NICHOOKS_OVS_ANTISPOOF=off\n"))
    r = dom0.vif("-v", "online", "type_if=vif")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert (dom0.root / "seen").read_text().strip() == \
        f"unset|{dom0.root}/conf|{dom0.root}/state|eth0"
    assert not (dom0.root / "evil-state").exists()
    assert names_in(dom0.root / "state", "nics") == [f"{UUID}.json"]
    ignored = sorted(line.split("ignored=")[1].split()[0] for line in r.stderr.splitlines()
                     if "ignored=" in line)
    assert ignored == ["LD_PRELOAD", "NICHOOKS_CONF_DIR", "NICHOOKS_OVS_ANTISPOOF",
                       "NICHOOKS_STATE_DIR"]
    assert dom0.master("vif5.0") == "br0"
    assert dom0.vif("offline", "type_if=vif").returncode == 0
    assert dom0.master("vif5.0") is None
