"""The agent stays small and quiet however long it runs: what it remembers is bounded
by the journaled NICs, a NIC it cannot repair is retried with back-off and reported
once per cause, and lock files go with their NIC."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

from tests.integration.agent_env import AgentProc
from tests.integration.bridged_env import Site
from tests.support.hooks import bin_path, wait_for
from tests.support.state import journals


def lock_files(site: Site) -> list[str]:
    """The per-NIC lock files: nftables.lock, the one lock every NIC's filter shares,
    has a fixed name and so cannot accumulate."""
    locks = site.state / "locks"
    names = sorted(os.listdir(locks)) if locks.exists() else []
    return [n for n in names if n != "nftables.lock"]


def test_lock_files_go_with_their_nic(site: Site) -> None:
    site.add_bridge("br0")
    site.add_tap()
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    assert lock_files(site) == [f"nic-{site.nic_uuid}.lock", "tap-tap0.lock"]
    assert site.hook("kvm-ifdown", "tap0").returncode == 0
    assert lock_files(site) == []
    # undone by a sweep after the tap vanished: the same
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    site.host.ip("link", "del", "tap0")
    r = site.host.run(bin_path("nichooks"), "sweep", env=site.env(), check=False)
    assert r.returncode == 0, r.stderr
    assert journals(site.state) == []
    assert lock_files(site) == []


def test_unrepairable_nic_is_retried_with_back_off_and_reported_once(
        site: Site, tmp_path: Path) -> None:
    site.add_bridge("br0")
    site.add_tap()
    env = site.env(NICHOOKS_AGENT_INTERVAL="0.1")
    with AgentProc(site.host, env, tmp_path / "agent.log") as agent:
        assert site.hook("kvm-ifup", "tap0").returncode == 0
        # br0 comes back as something that is not a bridge: tap0 cannot be put back
        site.host.ip("link", "del", "br0")
        site.host.ip("link", "add", "br0", "type", "veth", "peer", "name", "br0p")
        site.host.ip("link", "set", "br0", "up")
        wait_for("the first failed repair", lambda: "repair failed" in agent.log(), timeout=10)
        # Without back-off a try and an error line every tenth of a second: 30 by now.
        # (Absence over a window, proven by the one line that did arrive in it.) The
        # agent may have looked between the delete and the add ("no such device"): a
        # second cause, reported once too.
        time.sleep(3.0)
        failures = [line for line in agent.log().splitlines() if "repair failed" in line]
        causes = [line.split("detail=", 1)[1].split(" next_try=")[0] for line in failures]
        assert len(causes) == len(set(causes)) <= 2, "\n".join(failures)
        assert "is a veth device, not a bridge" in causes[-1], causes
        # the cause goes away: the next try succeeds and says after how many
        site.host.ip("link", "del", "br0")
        site.bridges.clear()
        site.add_bridge("br0")
        wait_for("tap0 back on br0", lambda: site.host.link("tap0").get("master") == "br0",
                 timeout=15)
        wait_for("the agent's report", lambda: "after_failures=" in agent.log(), timeout=15)
        assert site.hook("kvm-ifdown", "tap0").returncode == 0


def test_agent_remembers_only_devices_journals_depend_on(site: Site) -> None:
    """Deleted devices that no journal names leave nothing behind in the agent."""
    site.add_bridge("br0")
    site.add_tap()
    assert site.hook("kvm-ifup", "tap0").returncode == 0
    program = textwrap.dedent("""
        from nichooks import settings
        from nichooks.ops.agent import Agent
        from nichooks.host.linkwatch import LinkEvent

        agent = Agent(settings.load())
        agent._refresh_refs(force=True)
        events = [LinkEvent(deleted=True, index=1000 + i, name=f"gone{i}", up=False, master=None)
                  for i in range(500)]
        agent.handle(events)
        print(sorted(agent.seen), len(agent.taps))
        agent.close()
    """)
    r = site.host.run(sys.executable, "-c", program, env=site.env())
    assert r.stdout.split("]")[0] + "]" == "['br0']", r.stdout
    assert site.hook("kvm-ifdown", "tap0").returncode == 0
