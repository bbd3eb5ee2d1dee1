"""Routed-mode facts that need no kernel: EUI-64 derivation, table names, addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from nichooks.errors import InvalidInput, PlumbingError
from nichooks.host.netlink import AF_INET, AF_INET6, sysctl_name
from nichooks.model import nic as nicmod
from nichooks.model.addresses import eui64
from nichooks.modes.registry import nic_from_variables
from nichooks.modes.routed import addresses, resolve_table


def test_eui64_matches_slaac() -> None:
    # RFC 4291 appendix A: flip the U/L bit, insert ff:fe.
    assert eui64("2001:db8:1::/64", "aa:00:00:12:34:56") == "2001:db8:1:0:a800:ff:fe12:3456"
    assert eui64("2001:db8::/64", "02:00:00:00:00:01") == "2001:db8::ff:fe00:1"


def routed(**env: str) -> nicmod.Nic:
    base = {"MODE": "routed", "MAC": "aa:00:00:12:34:56", "INTERFACE": "tap0", "INSTANCE": "vm1"}
    return nic_from_variables({**base, **env})


def test_addresses_per_family() -> None:
    assert addresses(routed(IP="192.0.2.5")) == {AF_INET: "192.0.2.5"}
    assert addresses(routed(IP="192.0.2.5", NETWORK_SUBNET6="2001:db8:1::/64")) == {
        AF_INET: "192.0.2.5", AF_INET6: "2001:db8:1:0:a800:ff:fe12:3456"}
    assert addresses(routed(IP="2001:db8::7", NETWORK_SUBNET6="2001:db8:1::/64")) == {
        AF_INET6: "2001:db8::7"}
    assert addresses(routed(NETWORK_SUBNET6="2001:db8:1::/64")) == {
        AF_INET6: "2001:db8:1:0:a800:ff:fe12:3456"}


@pytest.mark.parametrize("env", [{}, {"NETWORK_SUBNET6": "2001:db8:1::/56"}])
def test_no_address_is_invalid_input(env: dict[str, str]) -> None:
    with pytest.raises(InvalidInput) as info:
        addresses(routed(**env))
    assert info.value.variable == "IP" and info.value.exit_status == 2


def test_table_names(tmp_path: Path) -> None:
    (tmp_path / "rt_tables").write_text("# comment\n255 local\n100\tpublic # the uplink\n")
    (tmp_path / "rt_tables.d").mkdir()
    (tmp_path / "rt_tables.d" / "x.conf").write_text("200 private\n")
    (tmp_path / "rt_tables.d" / "ignored.txt").write_text("300 nope\n")
    assert resolve_table(None, tmp_path) == 254
    assert resolve_table("100", tmp_path) == 100
    assert resolve_table("main", tmp_path) == 254
    assert resolve_table("public", tmp_path) == 100
    assert resolve_table("private", tmp_path) == 200
    with pytest.raises(PlumbingError, match="'nope'"):
        resolve_table("nope", tmp_path)


def test_sysctl_names_keep_dotted_devices_apart() -> None:
    assert sysctl_name("net/ipv4/ip_forward") == "net.ipv4.ip_forward"
    assert sysctl_name("net/ipv6/conf/eth0.100/proxy_ndp") == "net.ipv6.conf.eth0/100.proxy_ndp"


def test_hex_table_numbers(tmp_path: Path) -> None:
    (tmp_path / "rt_tables").write_text("0x64 public\nbad private\n")
    assert resolve_table("public", tmp_path) == 100
    with pytest.raises(PlumbingError):
        resolve_table("private", tmp_path)
