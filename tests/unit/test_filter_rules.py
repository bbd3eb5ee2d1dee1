"""The nftables filter as data: the per-instance policy from tags, the range matches that
stand for "none of these", and the shape that keeps a plug's cost flat (no anonymous
set anywhere, short per-NIC chains). What the rules do to packets is tested on the
real kernel (tests/integration/test_bridge_filter.py, test_routed_filter.py)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nichooks.errors import InvalidInput, PlumbingError
from nichooks.host import nft, nftrules
from nichooks.host.nftrules import Filter, drop_outside, gaps, shared_rules
from nichooks.model.policy import FilterPolicy, filter_policy
from nichooks.modes.registry import nic_from_variables
from tests.unit.test_nic import ganeti_env

MAC = "aa:00:00:12:34:56"
LINK_LOCAL = "fe80::a800:ff:fe12:3456"


def policy(tags: str, level: str = "on") -> FilterPolicy:
    return filter_policy(nic_from_variables(ganeti_env(TAGS=tags), tap="tap3"), level)


def test_addresses_are_ip_eui64_from_the_subnet_and_the_link_local() -> None:
    p = policy("prod")
    assert p.level == "on" and p.mac == MAC
    assert p.ipv4 == ("192.0.2.10",)
    assert set(p.ipv6) == {"2001:db8:1:0:a800:ff:fe12:3456", LINK_LOCAL}


@pytest.mark.parametrize(("tags", "host", "level"), [
    ("nichooks:antispoof:mac", "on", "mac"),
    ("nichooks:antispoof:off", "on", "off"),
    ("nichooks:antispoof:mac nichooks:antispoof:off", "on", "off"),
    ("nichooks:antispoof:mac", "off", "off"),  # a tag never raises the host's level
    ("web", "mac", "mac"),
])
def test_tags_only_lower_the_level(tags: str, host: str, level: str) -> None:
    assert policy(tags, host).level == level


def test_allow_ip_adds_sources_of_either_family_once() -> None:
    p = policy("nichooks:allow-ip:192.0.2.99 nichooks:allow-ip:2001:db8::99 "
               "nichooks:allow-ip:192.0.2.99")
    assert p.ipv4 == ("192.0.2.10", "192.0.2.99")
    assert "2001:db8::99" in p.ipv6


@pytest.mark.parametrize("tag", ["nichooks:antispoof:on", "nichooks:allow-ip:",
                                 "nichooks:allow-ip:10.0.0.300", "nichooks:antispof:off",
                                 "nichooks:allow-ip:1.2.3.4;reboot"])
def test_malformed_nichooks_tags_are_invalid_input_naming_tags(tag: str) -> None:
    with pytest.raises(InvalidInput) as err:
        policy(f"web {tag}")
    assert err.value.variable == "TAGS"


@given(st.sets(st.integers(0, 255), max_size=8))
def test_gaps_cover_exactly_what_is_not_allowed(allowed: set[int]) -> None:
    covered = [v for lo, hi in gaps(allowed, 0, 255) for v in range(lo, hi + 1)]
    assert sorted(covered) == [v for v in range(256) if v not in allowed]
    assert len(covered) == len(set(covered))


def test_one_allowed_value_is_one_inequality_rule() -> None:
    left = nftrules.field("ip", "saddr")
    assert drop_outside([], left, [7], 32) == [[nftrules.match(left, 7, "!="), nftrules.DROP]]
    assert len(drop_outside([], left, [7, 9], 32)) == 3


def _filters() -> list[Filter]:
    v4 = (ipaddress.IPv4Address("192.0.2.10"),)
    v6 = (ipaddress.IPv6Address("2001:db8:1:0:a800:ff:fe12:3456"),
          ipaddress.IPv6Address(LINK_LOCAL))
    return [Filter("bridge", "nic-k", "tap3", MAC, "on", v4, v6),
            Filter("bridge", "nic-k", "tap3", MAC, "mac", v4, v6, trunks=(10, 20)),
            Filter("bridge", "nic-k", "tap3", MAC, "on"),
            Filter("inet", "nic-k", "tap3", MAC, "on", v4, v6)]


def _walk(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value, *(x for v in value.values() for x in _walk(v))]
    if isinstance(value, list):
        return [x for v in value for x in _walk(v)]
    return [value]


@pytest.mark.parametrize("f", _filters(), ids=lambda f: f"{f.family}-{f.level}")
def test_no_rule_holds_an_anonymous_set_and_a_nics_chain_stays_short(f: Filter) -> None:
    """nftables 1.0.6 reads every set's elements with any listing of the table, and the
    kernel re-validates every reachable rule at each commit: either would make a plug
    with 1000 NICs filtered seconds (or tens of ms) slower than with none."""
    cmds = nftrules.install(f, replace_element=False)
    assert not any(isinstance(x, dict) and "set" in x for x in _walk(cmds))
    assert len(f.rules()) <= 25
    assert f.rules()[-1] == [nftrules.GUEST]  # every NIC ends in the shared checks


def test_shared_chains_end_in_a_verdict_and_digests_are_stable() -> None:
    bridge = shared_rules("bridge")
    assert bridge["guest"][-1] == [nftrules.DROP]
    assert shared_rules("inet")["guest"][-1] == [nftrules.ACCEPT]
    assert bridge["unspecified"][-1] == [nftrules.GUEST]
    assert nftrules.shared_digest("bridge") == nftrules.shared_digest("bridge")
    assert nftrules.shared_digest("bridge") != nftrules.shared_digest("inet")
    a, b = _filters()[:2]
    assert a.digest() != b.digest()
    json.dumps(nftrules.skeleton("bridge"))  # plain JSON


def test_missing_binding_names_the_package_and_the_way_out(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(nft, "BINDING", tmp_path / "nftables")
    monkeypatch.setattr(nft, "_module", [])
    with pytest.raises(PlumbingError) as err:
        nft.Nft().run([])
    text = str(err.value)
    assert "apt-get install python3-nftables" in text
    assert "NICHOOKS_ANTISPOOF=off" in text and "\n" not in text
