"""Bridged mode on the real kernel: a host namespace, bridges, and a guest
namespace behind a veth pair whose host end plays the tap."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.bridged_env import Site
from tests.integration.syslog_capture import SyslogLine, SyslogSocket, run_with_dev_log
from tests.support.constants import GUEST_MAC, OTHER_MAC, OTHER_UUID
from tests.support.hooks import bin_path, one_line
from tests.support.links import assert_bridge_port
from tests.support.scripts import write_script
from tests.support.state import journals, tap_index

# The taps' own MACs: the kernel's random veth MAC starts with fe one time in 64, and
# then a plug that skipped the MAC step would look right. Neither starts with fe, nor
# shares its last five octets with GUEST_MAC.
TAP_MAC = "02:00:00:00:0a:01"
OTHER_TAP_MAC = "06:00:00:00:0a:02"


def ready(site: Site, mtu: int = 1500) -> dict[str, object]:
    site.add_bridge("br0", mtu=mtu, addr="192.0.2.1/24")
    site.add_tap()
    site.host.ip("link", "set", "tap0", "address", TAP_MAC)
    return site.host.snapshot()


def own_mac(site: Site, tap: str = "tap0") -> str:
    """The tap's MAC as the kernel has it, read before the plug."""
    mac: str = site.host.link(tap)["address"]
    assert not mac.startswith("fe:") and mac[2:] != GUEST_MAC[2:], mac
    return mac


def test_ifup_ifdown_on_jumbo_bridge_returns_namespace(site: Site) -> None:
    before = ready(site, mtu=9000)
    mac = own_mac(site)
    up = site.hook("kvm-ifup", "tap0")
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""
    assert_bridge_port(site.host, "tap0", "br0", mac)
    assert site.host.link("tap0")["mtu"] == 9000
    [journal] = journals(site.state)
    assert journal["key"] == site.nic_uuid and journal["tap"] == "tap0"
    assert journal["state"] == "applied"
    assert tap_index(site.state) == {"tap0": site.nic_uuid}
    ping = site.guest.run("ping", "-c", "2", "-i", "0.2", "-W", "2", "192.0.2.1", check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    down = site.hook("kvm-ifdown", "tap0")
    assert down.returncode == 0, down.stderr
    assert site.host.snapshot() == before
    assert journals(site.state) == [] and tap_index(site.state) == {}


def test_ifup_twice_converges_to_one_plug(site: Site) -> None:
    before = ready(site)
    mac = own_mac(site)
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    first = site.host.link("tap0")
    again = site.hook("kvm-ifup", "tap0")
    assert again.returncode == 0, again.stderr
    assert_bridge_port(site.host, "tap0", "br0", mac)
    assert site.host.link("tap0")["address"] == first["address"]
    assert len(journals(site.state)) == 1
    assert site.hook("kvm-ifdown", "tap0").returncode == 0
    assert site.host.snapshot() == before


def test_ifup_with_new_link_moves_the_nic(site: Site) -> None:
    ready(site)
    site.add_bridge("br1", mtu=1400)
    before = site.host.snapshot()
    mac = own_mac(site)
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    moved = site.hook("kvm-ifup", "tap0", env=site.env(LINK="br1"))
    assert moved.returncode == 0, moved.stderr
    assert_bridge_port(site.host, "tap0", "br1", mac)
    assert site.host.link("tap0")["mtu"] == 1400
    assert site.host.ipj("link", "show", "master", "br0") == []
    [journal] = journals(site.state)
    assert journal["link"] == "br1"
    assert site.hook("kvm-ifdown", "tap0", "false").returncode == 0
    assert site.host.snapshot() == before


def test_ganeti_stock_call_without_argument_and_bogus_argv(site: Site) -> None:
    """Stock Ganeti execs us as /etc/ganeti/kvm-vif-bridge with no argument; when
    INTERFACE is set, argv[1] is informational and can never fail the call."""
    before = ready(site)
    mac = own_mac(site)
    assert site.hook("kvm-ifup").returncode == 0
    assert_bridge_port(site.host, "tap0", "br0", mac)
    again = site.hook("kvm-ifup", "../not a tap!")
    assert again.returncode == 0, again.stderr
    assert site.hook("kvm-ifdown", "tap0", "true").returncode == 0
    assert site.host.snapshot() == before


def test_ganeti_action_down_runs_the_teardown(site: Site) -> None:
    before = ready(site)
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    down = site.hook("kvm-ifup", "tap0", env=site.env(ACTION="down"))
    assert down.returncode == 0, down.stderr
    assert site.host.snapshot() == before and journals(site.state) == []


def test_spec_file_for_plain_qemu(site: Site) -> None:
    before = ready(site)
    specs = site.state / "specs"
    specs.mkdir()
    (specs / "tap0").write_text(f'INSTANCE=vm1\nMAC={GUEST_MAC}\nMODE="bridged"\nLINK=br0\n')
    env = site.env(MODE=None, LINK=None, INTERFACE=None, MAC=None, INSTANCE=None,
                   INTERFACE_UUID=None, VLAN=None, TAGS=None, INTERFACE_INDEX=None)
    mac = own_mac(site)
    up = site.hook("kvm-ifup", "tap0", env=env)
    assert up.returncode == 0, up.stderr
    assert_bridge_port(site.host, "tap0", "br0", mac)
    assert site.hook("kvm-ifdown", "tap0", env=env).returncode == 0
    assert site.host.snapshot() == before


def test_ifdown_after_the_tap_vanished(site: Site) -> None:
    ready(site)
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    site.host.ip("link", "del", "tap0")
    down = site.hook("kvm-ifdown", "tap0")
    assert down.returncode == 0 and down.stderr == ""
    assert journals(site.state) == [] and tap_index(site.state) == {}


def test_ifdown_of_unknown_tap_is_a_no_op(site: Site) -> None:
    ready(site)
    down = site.hook("kvm-ifdown", "tap0", env=site.env(INTERFACE_UUID=None, INTERFACE=None))
    assert down.returncode == 0 and down.stderr == ""


@pytest.mark.parametrize("case,expect", [
    ("no-bridge", "LINK br9: no such device"),
    ("veth-link", "is a veth device, not a bridge"),
    ("port-link", "is a port of bridge br0, not a bridge"),
    ("no-tap", "tap tap7 does not exist"),
    ("vlan", "cannot filter VLANs"),
])
def test_refusals_leave_the_tap_exactly_as_found(site: Site, case: str, expect: str) -> None:
    ready(site)
    site.host.ip("link", "add", "vx0", "type", "veth", "peer", "name", "vx1")
    site.host.ip("link", "set", "vx1", "master", "br0")
    site.host.ip("link", "set", "tap0", "mtu", "1400")  # something ifup would change
    before = site.host.snapshot()
    env = {
        "no-bridge": site.env(LINK="br9"),
        "veth-link": site.env(LINK="vx0"),
        "port-link": site.env(LINK="vx1"),
        "no-tap": site.env(INTERFACE="tap7"),
        "vlan": site.env(VLAN=".100"),
    }[case]
    result = site.hook("kvm-ifup", "tap0", env=env)
    assert result.returncode == 1
    assert expect in one_line(result.stderr)
    assert site.host.snapshot() == before
    assert journals(site.state) == [] and tap_index(site.state) == {}


def test_killed_ifup_is_converged_by_the_next_ifup(site: Site) -> None:
    before = ready(site)
    mac = own_mac(site)
    killed = site.hook("kvm-ifup", "tap0", env=site.env(NICHOOKS_TEST_FAULT="kill-after:2"))
    # SIGKILLed (`ip netns exec` execs the hook, so the status is the hook's own):
    # after the MAC and MTU steps, before it was attached, its journal half-way.
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    half = site.host.link("tap0")
    assert half["address"] == "fe" + mac[2:] and half.get("master") is None
    [journal] = journals(site.state)
    records = journal["records"]
    assert journal["state"] == "applying" and isinstance(records, list) and len(records) == 2
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    assert_bridge_port(site.host, "tap0", "br0", mac)
    assert site.hook("kvm-ifdown", "tap0").returncode == 0
    assert site.host.snapshot() == before


def test_tap_name_reused_by_another_nic(site: Site) -> None:
    """A crashed guest's journal still claims tap0 when the kernel hands the name to a
    new guest: ifup of the new NIC undoes the stale claim without touching its tap."""
    ready(site)
    site.add_bridge("br1")
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    site.host.ip("link", "del", "tap0")
    site.add_tap(guest_if="eth1")
    site.host.ip("link", "set", "tap0", "address", OTHER_TAP_MAC)
    mac = own_mac(site)
    other = site.env(INTERFACE_UUID=OTHER_UUID, LINK="br1", MAC=OTHER_MAC)
    up = site.hook("kvm-ifup", "tap0", env=other)
    assert up.returncode == 0, up.stderr
    assert_bridge_port(site.host, "tap0", "br1", mac)
    [journal] = journals(site.state)
    assert journal["key"] == OTHER_UUID
    assert site.hook("kvm-ifdown", "tap0").returncode == 0
    assert journals(site.state) == []


def test_status_reports_items(site: Site) -> None:
    ready(site)
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    status = site.hook("nichooks", "status")
    assert status.returncode == 0, status.stderr
    assert "inst1.example.org tap0" in status.stdout
    assert "[present] attach tap0 to bridge br0" in status.stdout
    site.host.ip("link", "set", "tap0", "nomaster")
    status = site.hook("nichooks", "status")
    assert "[MISSING] attach tap0 to bridge br0" in status.stdout
    site.hook("kvm-ifdown", "tap0")


def test_plan_changes_nothing(site: Site) -> None:
    before = ready(site, mtu=9000)
    plan = site.hook("nichooks", "plan", "tap0")
    assert plan.returncode == 0, plan.stderr
    assert "attach tap0 to bridge br0" in plan.stdout and "MTU to 9000" in plan.stdout
    as_json = site.hook("nichooks", "plan", "--json", "tap0")
    assert '"step": "link.master"' in as_json.stdout
    assert site.host.snapshot() == before and journals(site.state) == []


def test_no_syslog_means_silence(site: Site, tmp_path: Path) -> None:
    """With no /dev/log at all (a private mount namespace whose /dev has none, checked
    in the hook's own namespace, whatever this machine has), the log lines are dropped:
    nothing on stdout or stderr, unless -v asks for them."""
    before = ready(site)
    stage = tmp_path / "dev"

    def hook(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_with_dev_log(site.host, [bin_path(name), *args], site.env(), stage, None)

    up = hook("kvm-ifup", "tap0")
    assert (up.returncode, up.stdout, up.stderr) == (0, "", "")
    assert site.host.link("tap0").get("master") == "br0"  # it did work, silently
    verbose = hook("kvm-ifup", "-v", "tap0")
    assert verbose.returncode == 0, verbose.stderr
    assert "event=step" in verbose.stderr and f"uuid={site.nic_uuid}" in verbose.stderr
    down = hook("kvm-ifdown", "tap0")
    assert (down.returncode, down.stdout, down.stderr) == (0, "", "")
    assert site.host.snapshot() == before


def step_lines(lines: list[SyslogLine], event: str) -> list[dict[str, str]]:
    return [line.fields for line in lines if line.fields.get("event") == event]


def test_syslog_gets_one_structured_line_per_step(site: Site, tmp_path: Path) -> None:
    """With a syslog socket at /dev/log (the test's own, bound there in a private
    mount namespace), every step of ifup and every undo of ifdown is one line as
    daemon.info from `nichooks`, naming the instance, NIC, tap, context, step and
    result; and nothing is printed."""
    before = ready(site)
    mac = own_mac(site)
    steps = [f"set tap0 MAC to fe{mac[2:]}", "set tap0 MTU to 1500",
             "sysctl net.ipv6.conf.tap0.disable_ipv6=1",
             f"filter tap0 in nftables bridge nichooks (on: MAC {site.env()['MAC']})",
             "attach tap0 to bridge br0", "set root_block on bridge port tap0", "bring tap0 up"]
    nic = {"instance": "inst1.example.org", "uuid": site.nic_uuid, "tap": "tap0"}
    with SyslogSocket(tmp_path / "log.sock") as syslog:

        def hook(name: str, *args: str) -> tuple[subprocess.CompletedProcess[str], list[SyslogLine]]:
            result = run_with_dev_log(site.host, [bin_path(name), *args], site.env(),
                                      tmp_path / "dev", syslog.path)
            return result, syslog.take()

        up, lines = hook("kvm-ifup", "tap0")
        assert (up.returncode, up.stdout, up.stderr) == (0, "", "")
        assert lines, "no syslog datagram arrived"
        assert {(line.priority, line.ident) for line in lines} == {(3 * 8 + 6, "nichooks")}
        logged = step_lines(lines, "step")
        assert [f.get("step") for f in logged] == steps
        for fields in logged:
            facts = {"rules": fields.get("rules")} if "filter" in fields["step"] else {}
            assert fields == {**nic, "context": "start", "mode": "bridged", "event": "step",
                              "step": fields["step"], "result": "ok", **facts}
        [done] = step_lines(lines, "ifup")
        assert (done["result"], done["steps"], done["uuid"]) == ("ok", str(len(steps)), site.nic_uuid)

        down, lines = hook("kvm-ifdown", "tap0")
        assert (down.returncode, down.stdout, down.stderr) == (0, "", "")
        undone = step_lines(lines, "undo")
        assert [f.get("step") for f in undone] == steps[::-1]
        for fields in undone:
            assert {k: fields.get(k) for k in (*nic, "context", "result")} == {
                **nic, "context": "shutdown", "result": "ok"}
    assert site.host.snapshot() == before


def test_custom_scripts_get_the_nic_and_context(site: Site) -> None:
    before = ready(site)
    seen = site.state / "seen"
    body = f'echo "$ACTION $NICHOOKS_CONTEXT $1 $INTERFACE $MODE $LINK $INSTANCE [$TAGS]" >> {seen}'
    write_script(site.conf / "ifup.d", "10-record", body)
    write_script(site.conf / "ifdown.d", "10-record", body)
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    # QEMU's downscript passes no environment: the scripts still see the NIC's variables
    bare = site.env(INSTANCE=None, MAC=None, MODE=None, LINK=None, INTERFACE=None,
                    INTERFACE_UUID=None, TAGS=None, VLAN=None, INTERFACE_INDEX=None)
    assert site.hook("kvm-ifdown", "tap0", "hot-unplug", env=bare).returncode == 0
    assert seen.read_text().splitlines() == [
        "up start tap0 tap0 bridged br0 inst1.example.org [web prod]",
        "down hot-unplug tap0 tap0 bridged br0 inst1.example.org [web prod]",
    ]
    assert site.host.snapshot() == before


def test_failing_ifup_script_rolls_back(site: Site) -> None:
    before = ready(site)
    write_script(site.conf / "ifup.d", "50-fail", "echo 'firewall not ready' >&2; exit 4")
    result = site.hook("kvm-ifup", "tap0")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "50-fail exited with status 4: firewall not ready" in line
    assert site.host.snapshot() == before and journals(site.state) == []


def test_unsafe_ifup_script_is_refused_and_rolls_back(site: Site) -> None:
    before = ready(site)
    path = write_script(site.conf / "ifup.d", "10-x", "true")
    os.chown(path, 65534, 65534)
    result = site.hook("kvm-ifup", "tap0")
    assert result.returncode == 1
    assert "owned by uid 65534, not root" in one_line(result.stderr)
    assert site.host.snapshot() == before and journals(site.state) == []


def test_failing_ifdown_script_is_reported_not_fatal(site: Site) -> None:
    before = ready(site)
    write_script(site.conf / "ifdown.d", "10-fail", "exit 9")
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    result = site.hook("kvm-ifdown", "tap0")
    assert result.returncode == 0
    assert "10-fail exited with status 9" in result.stderr
    assert site.host.snapshot() == before and journals(site.state) == []


@pytest.mark.parametrize("overrides,variable", [
    ({"MAC": "zz"}, "MAC"), ({"INTERFACE": "a/b"}, "INTERFACE"), ({"VLAN": ".0"}, "VLAN"),
    ({"MODE": "bogus"}, "MODE"), ({"INTERFACE_UUID": "1; reboot"}, "INTERFACE_UUID"),
])
def test_invalid_input_exits_2_and_changes_nothing(site: Site, overrides: dict[str, str],
                                                   variable: str) -> None:
    before = ready(site)
    result = site.hook("kvm-ifup", "tap0", env=site.env(**overrides))
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"nichooks: {variable}: ")
    assert site.host.snapshot() == before
    assert journals(site.state) == []


def test_bad_ifdown_context_is_invalid(site: Site) -> None:
    ready(site)
    result = site.hook("kvm-ifdown", "tap0", "sideways")
    assert result.returncode == 2 and "CONTEXT" in one_line(result.stderr)


def test_refused_ifup_keeps_the_earlier_plug(site: Site) -> None:
    """A hot-modify to a LINK that does not exist is refused before the old plug is
    undone: the NIC stays where it was, with its journal."""
    ready(site)
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    plugged = site.host.snapshot()
    journal = journals(site.state)
    result = site.hook("kvm-ifup", "tap0", env=site.env(LINK="br9"))
    assert result.returncode == 1 and "br9: no such device" in one_line(result.stderr)
    assert site.host.snapshot() == plugged and journals(site.state) == journal
    site.hook("kvm-ifdown", "tap0")
