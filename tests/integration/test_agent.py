"""The agent on the real kernel: NICs whose tap vanishes without an ifdown are undone
within a second, a newer plug on a reused tap name is kept, and what someone else
removed from a live NIC is put back from its journal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agent_env import AgentProc, timed
from tests.integration.bridged_env import Site
from tests.nstools import Netns, require_root, wait_for

VANISH_LIMIT = 1.0  # the bound for undoing a vanished NIC


@pytest.fixture
def site(dirs: tuple[Path, Path]) -> Iterator[Site]:
    require_root()
    host, guest = Netns(), Netns()
    try:
        yield Site(host=host, guest=guest, state=dirs[0], conf=dirs[1])
    finally:
        guest.delete()
        host.delete()


def agent_for(site: Site, tmp: Path) -> AgentProc:
    return AgentProc(site.host, site.env(), tmp / "agent.log")


def without(snapshot: dict[str, object], *links: str) -> dict[str, object]:
    out = dict(snapshot)
    out["links"] = [link for link in snapshot["links"] if link["ifname"] not in links]  # type: ignore[attr-defined,index]
    return out


def test_bridged_tap_vanishes_and_is_undone(site: Site, tmp_path: Path) -> None:
    site.add_bridge("br0")
    site.add_tap()
    with agent_for(site, tmp_path) as agent:
        before = site.host.snapshot()
        assert site.hook("kvm-ifup", "tap0").returncode == 0
        site.host.ip("link", "del", "tap0")
        took = timed("the journal to go", lambda: not site.journals(), VANISH_LIMIT)
        assert site.tap_index() == []
        assert site.host.snapshot() == without(before, "tap0")
        assert "result=undone" in agent.log(), agent.log()
    assert agent.proc is not None and agent.proc.returncode == 0, agent.log()
    print(f"vanished bridged NIC undone in {took * 1000:.0f} ms")


def test_bridge_recreated_and_tap_detached_are_reattached(site: Site, tmp_path: Path) -> None:
    site.add_bridge("br0")
    site.add_tap()
    with agent_for(site, tmp_path) as agent:
        assert site.hook("kvm-ifup", "tap0").returncode == 0
        site.host.ip("link", "set", "tap0", "nomaster")
        wait_for("tap0 back on br0", lambda: site.host.link("tap0").get("master") == "br0")
        site.host.ip("link", "del", "br0")
        site.bridges.clear()
        site.add_bridge("br0")
        wait_for("tap0 on the new br0", lambda: site.host.link("tap0").get("master") == "br0")
        assert "result=repaired" in agent.log()
        assert site.hook("kvm-ifdown", "tap0").returncode == 0
        assert site.host.link("tap0").get("master") is None
