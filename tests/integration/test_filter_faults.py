"""Bridged NICs' nftables filters when something goes wrong around them: a flushed
ruleset (status says so, the agent puts the filter back), a filter step that fails
(the whole plug is rolled back), a journal lost in a crash (the sweep deletes the
orphan chain, and nothing that is not ours), a malformed tag (refused before any
change).

The ruleset is read with `nft -j list ruleset` in the host namespace, never through
nichooks' own nftables code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.agent_env import AgentProc
from tests.integration.bridged_env import Site
from tests.support.hooks import one_line, wait_for
from tests.support.netns import Netns
from tests.support.state import journal_path, journals, names_in, tap_index

TAP_MAC = "02:00:00:00:0a:01"
# The agent audits every NICHOOKS_AGENT_INTERVAL and makes a full pass (which repairs
# too) every 15 of them (nichooks.ops.agent.SWEEP_EVERY): 30 s here, past the deadline,
# so that a repair within the deadline while the agent runs is the audit's.
AGENT_INTERVAL = 2
REPAIR_DEADLINE = 20.0


def ready(site: Site) -> dict[str, Any]:
    """br0 and tap0 (with a MAC of its own, not the guest's); the snapshot before ifup."""
    site.add_bridge("br0", addr="192.0.2.1/24")
    site.add_tap()
    site.host.ip("link", "set", "tap0", "address", TAP_MAC)
    return site.host.snapshot()


def nft(ns: Netns, *args: str) -> None:
    ns.run("nft", *args)


def chain_of(site: Site) -> str:
    return f"nic-{site.nic_uuid}"


def filtered(site: Site) -> bool:
    """tap0's filter is in place: its chain, and the map element sending tap0 there."""
    view = site.host.nft_table("bridge")
    return (view is not None and chain_of(site) in view["chains"]
            and view["elements"].get("tap0") == chain_of(site))


def wait_repaired(site: Site, agent: AgentProc) -> None:
    try:
        wait_for("the agent to put tap0's filter back", lambda: filtered(site), REPAIR_DEADLINE)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nruleset: {site.host.nft_ruleset()}\n"
                             f"--- agent log ---\n{agent.log()}") from None


def ifup(site: Site, **overrides: str) -> None:
    up = site.hook("kvm-ifup", "tap0", env=site.env(**overrides))
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""


# --- (a) a flushed ruleset: status says MISSING, the agent repairs ------------------------
def test_flushed_ruleset_is_reported_and_repaired_by_the_agent(site: Site, tmp_path: Path) -> None:
    before = ready(site)
    ifup(site)
    assert filtered(site), site.host.nft_ruleset()
    status = site.hook("nichooks", "status")
    assert status.returncode == 0, status.stderr
    assert "[present] filter tap0 in nftables bridge nichooks" in status.stdout, status.stdout

    site.host.run("nft", "flush", "ruleset")
    assert site.host.nft_table("bridge") is None
    status = site.hook("nichooks", "status")
    # status reports; it does not fail (a missing item is a finding, not an error)
    assert status.returncode == 0, status.stderr
    missing = [ln.strip() for ln in status.stdout.splitlines() if ln.strip().startswith("[MISSING]")]
    assert missing == [f"[MISSING] filter tap0 in nftables bridge nichooks (on: MAC "
                       f"{site.env()['MAC']})"], status.stdout

    agent = AgentProc(site.host, site.env(NICHOOKS_AGENT_INTERVAL=str(AGENT_INTERVAL)),
                      tmp_path / "agent.log")
    with agent:
        # Found missing at start (its first full pass) or by its first audit.
        wait_repaired(site, agent)
        # Flushed again while it runs: only the periodic audit can notice this within
        # the deadline (the next full pass is SWEEP_EVERY intervals away).
        site.host.run("nft", "flush", "ruleset")
        assert site.host.nft_table("bridge") is None
        wait_repaired(site, agent)
    status = site.hook("nichooks", "status")
    assert "[MISSING]" not in status.stdout, status.stdout

    down = site.hook("kvm-ifdown", "tap0")
    assert down.returncode == 0, down.stderr
    assert site.host.snapshot() == before
    assert journals(site.state) == [] and tap_index(site.state) == {}


def guest_rules(site: Site) -> int:
    """How many rules the shared chain `guest` (every NIC's chain ends there) holds."""
    return sum(1 for i in site.host.nft_ruleset()
               if "rule" in i and i["rule"].get("family") == "bridge"
               and i["rule"].get("table") == "nichooks" and i["rule"].get("chain") == "guest")


def test_emptied_shared_chain_is_reported_and_repaired_by_the_agent(site: Site,
                                                                    tmp_path: Path) -> None:
    """Every NIC's chain ends in `goto guest`: emptied, it would let the NIC's other
    frames through. status says so for the NIC, and the agent's audit refills it."""
    ready(site)
    ifup(site)
    full = guest_rules(site)
    assert full > 0
    site.host.run("nft", "flush", "chain", "bridge", "nichooks", "guest")
    assert guest_rules(site) == 0
    status = site.hook("nichooks", "status")
    assert status.returncode == 0, status.stderr
    assert "[MISSING] filter tap0 in nftables bridge nichooks" in status.stdout, status.stdout
    agent = AgentProc(site.host, site.env(NICHOOKS_AGENT_INTERVAL=str(AGENT_INTERVAL)),
                      tmp_path / "agent.log")
    with agent:
        wait_for("the agent to refill the shared chain", lambda: guest_rules(site) == full,
                 REPAIR_DEADLINE)
    assert "[MISSING]" not in site.hook("nichooks", "status").stdout
    assert site.hook("kvm-ifdown", "tap0").returncode == 0


# --- (b) a filter step that fails rolls the whole plug back -------------------------------
def test_failed_filter_step_rolls_back_everything(site: Site) -> None:
    ready(site)
    # Our table, with a set where our verdict map must go: the filter's transaction
    # cannot apply.
    nft(site.host, "add", "table", "bridge", "nichooks")
    nft(site.host, "add", "set", "bridge", "nichooks", "nics", "{ type ipv4_addr; }")
    nft(site.host, "add", "element", "bridge", "nichooks", "nics", "{ 192.0.2.9 }")
    before = site.host.snapshot()
    conflicting = site.host.nft_table("bridge")
    assert conflicting is not None and conflicting["sets"] == {"nics": "ipv4_addr"}, conflicting

    up = site.hook("kvm-ifup", "tap0")
    assert up.returncode == 1, up.stdout + up.stderr  # a plumbing failure
    line = one_line(up.stderr)
    assert f"({site.nic_uuid}): step filter tap0 in nftables bridge nichooks" in line, line
    assert site.host.link("tap0").get("master") is None, site.host.link("tap0")
    assert names_in(site.state, "nics") == []
    assert names_in(site.state, "taps") == []
    assert site.host.nft_table("bridge") == conflicting
    assert site.host.snapshot() == before


# --- (c) the sweep deletes orphan chains, keeps live ones, never touches others -----------
def lose_journal(site: Site) -> None:
    """What a crash that lost the state directory's files leaves: the filter, no
    journal and no tap index entry."""
    journal_path(site.state, site.nic_uuid).unlink()
    (site.state / "taps" / "tap0").unlink()
    assert names_in(site.state, "nics") == [] and names_in(site.state, "taps") == []


def with_foreign_table(site: Site) -> list[dict[str, Any]]:
    nft(site.host, "add", "table", "bridge", "foreign")
    nft(site.host, "add", "chain", "bridge", "foreign", "c")
    nft(site.host, "add", "rule", "bridge", "foreign", "c", "counter")
    return foreign(site)


def foreign(site: Site) -> list[dict[str, Any]]:
    """Everything of table bridge foreign in the ruleset."""
    return [i for i in site.host.nft_ruleset()
            if any(isinstance(o, dict) and o.get("family") == "bridge"
                   and (o.get("table") == "foreign" or ("table" not in o and o.get("name") == "foreign"))
                   for o in i.values())]


def test_sweep_deletes_an_orphan_filter_and_leaves_foreign_tables(site: Site) -> None:
    ready(site)
    theirs = with_foreign_table(site)
    assert len(theirs) == 3, theirs  # the table, its chain, its rule
    ifup(site)
    assert filtered(site)
    lose_journal(site)
    site.host.ip("link", "del", "tap0")  # the guest is gone too: nothing live is behind it

    sweep = site.hook("nichooks", "sweep")
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert (f"orphan-filter: nftables bridge nichooks {chain_of(site)}: deleted: no journal for "
            f"{site.nic_uuid}") in sweep.stdout, sweep.stdout
    assert site.host.nft_table("bridge") is None, site.host.nft_ruleset()
    assert foreign(site) == theirs
    again = site.hook("nichooks", "sweep")
    assert again.returncode == 0 and chain_of(site) not in again.stdout, again.stdout
    assert foreign(site) == theirs


def test_sweep_keeps_an_orphan_filter_whose_tap_exists(site: Site) -> None:
    ready(site)
    theirs = with_foreign_table(site)
    ifup(site)
    lose_journal(site)
    kept = site.host.nft_ruleset()

    sweep = site.hook("nichooks", "sweep")
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert (f"kept: nftables bridge nichooks {chain_of(site)}: no journal for {site.nic_uuid}, "
            "but tap0 exists; left alone") in sweep.stdout, sweep.stdout
    assert filtered(site), site.host.nft_ruleset()
    assert site.host.nft_ruleset() == kept
    assert foreign(site) == theirs


# --- (d) a malformed tag is refused before anything changes --------------------------------
def test_malformed_tag_exits_2_and_changes_nothing(site: Site) -> None:
    before = ready(site)
    up = site.hook("kvm-ifup", "tap0", env=site.env(TAGS="web nichooks:bogus"))
    assert up.returncode == 2, up.stdout + up.stderr
    line = one_line(up.stderr)
    assert line.startswith("nichooks: TAGS: "), line
    assert "nichooks:bogus" in line, line
    assert site.host.snapshot() == before
    assert journals(site.state) == [] and tap_index(site.state) == {}
