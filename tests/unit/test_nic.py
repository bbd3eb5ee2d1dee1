"""The NIC model: every Ganeti variable, every validation error (exit 2, one line
naming the variable), and the values custom scripts will see."""

from __future__ import annotations

import ipaddress

import pytest

from nichooks.errors import InvalidInput
from nichooks.modes.registry import nic_from_variables

UUID = "6b1a2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def ganeti_env(**overrides: str | None) -> dict[str, str]:
    """What Ganeti 3.0 passes for a NIC in a network."""
    env = {
        "PATH": "/usr/bin:/sbin:/usr/sbin", "INSTANCE": "web1.example.org",
        "MAC": "aa:00:00:12:34:56", "MODE": "bridged", "INTERFACE": "tap3",
        "INTERFACE_INDEX": "1", "INTERFACE_UUID": UUID, "TAGS": "prod web",
        "IP": "192.0.2.10", "INTERFACE_NAME": "eth-front", "LINK": "br0", "VLAN": "",
        "BRIDGE": "br0", "NETWORK_NAME": "front", "NETWORK_UUID": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
        "NETWORK_TAGS": "public", "NETWORK_SUBNET": "192.0.2.0/24",
        "NETWORK_GATEWAY": "192.0.2.1", "NETWORK_SUBNET6": "2001:db8:1::/64",
        "NETWORK_GATEWAY6": "2001:db8:1::1", "NETWORK_MAC_PREFIX": "aa:00:00",
    }
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def test_full_ganeti_environment() -> None:
    nic = nic_from_variables(ganeti_env(), tap="ignored")
    assert nic.instance == "web1.example.org"
    assert nic.mac == "aa:00:00:12:34:56"
    assert nic.mode == "bridged" and nic.link == "br0"
    assert nic.tap == "tap3"  # INTERFACE is authoritative over argv
    assert nic.uuid == UUID and not nic.uuid_derived and nic.key == UUID
    assert nic.index == 1 and nic.name == "eth-front"
    assert nic.ip == ipaddress.ip_address("192.0.2.10")
    assert nic.vlan is None
    assert nic.tags == ("prod", "web")
    assert nic.network.name == "front" and nic.network.subnet6 == "2001:db8:1::/64"
    assert nic.network.tags == ("public",) and nic.network.mac_prefix == "aa:00:00"
    assert nic.variables["TAGS"] == "prod web"
    assert "PATH" not in nic.variables


def test_minimal_environment_and_derived_key() -> None:
    env = {"MODE": "bridged", "MAC": "AA:00:00:00:00:01", "LINK": "br0"}
    nic = nic_from_variables(env, tap="tap0")
    assert nic.tap == "tap0" and nic.mac == "aa:00:00:00:00:01"
    assert nic.uuid_derived
    assert nic.uuid == nic_from_variables(env, tap="tap9").uuid  # stable, not per tap


def test_bridge_alias_from_ganeti_2_4() -> None:
    nic = nic_from_variables(ganeti_env(LINK=None), tap=None)
    assert nic.link == "br0"


def test_xen_nic_file_tags_are_space_separated() -> None:
    nic = nic_from_variables(ganeti_env(TAGS="t1\\ t2\\ t3"), tap=None)
    assert nic.tags == ("t1", "t2", "t3") and nic.variables["TAGS"] == "t1 t2 t3"


@pytest.mark.parametrize("vlan,access,trunks", [
    ("", None, ()), ("100", 100, ()), (".100", 100, ()), (":100:200", None, (100, 200)),
    (".100:200", 100, (200,)),
])
def test_vlan_variants(vlan: str, access: int | None, trunks: tuple[int, ...]) -> None:
    nic = nic_from_variables(ganeti_env(VLAN=vlan), tap=None)
    if vlan == "":
        assert nic.vlan is None
    else:
        assert nic.vlan is not None
        assert (nic.vlan.access, nic.vlan.trunks) == (access, trunks)


def test_routed_link_is_a_table() -> None:
    nic = nic_from_variables(ganeti_env(MODE="routed", LINK="100", BRIDGE=None), tap=None)
    assert nic.link == "100"
    nic = nic_from_variables(ganeti_env(MODE="routed", LINK="public_v4", BRIDGE=None), tap=None)
    assert nic.link == "public_v4"


@pytest.mark.parametrize("overrides,variable,fragment", [
    ({"MODE": None}, "MODE", "is not set"),
    ({"MODE": "vepa"}, "MODE", "is not one of"),
    ({"MAC": None}, "MAC", "is not set"),
    ({"MAC": "aa:00:00:12:34"}, "MAC", "is not a MAC address"),
    ({"MAC": "01:00:5e:00:00:01"}, "MAC", "multicast"),
    ({"MAC": "00:00:00:00:00:00"}, "MAC", "all-zero"),
    ({"MAC": "aa:00:00:12:34:5g"}, "MAC", "is not a MAC address"),
    ({"INTERFACE": "tap0123456789abcdef"}, "INTERFACE", "longer than 15 bytes"),
    ({"INTERFACE": "../etc"}, "INTERFACE", "contains '/'"),
    ({"INTERFACE": "tap 0"}, "INTERFACE", "contains ' '"),
    ({"INTERFACE": "tap:0"}, "INTERFACE", "contains ':'"),
    ({"INTERFACE": ".."}, "INTERFACE", "not a valid interface name"),
    ({"INTERFACE": "tap\n0"}, "INTERFACE", "control character"),
    ({"INTERFACE": "täp0"}, "INTERFACE", "not ASCII"),
    ({"LINK": "br0;reboot;reboot", "BRIDGE": None}, "LINK", "longer than 15"),
    ({"LINK": "br/0", "BRIDGE": None}, "LINK", "contains '/'"),
    ({"LINK": None, "BRIDGE": None}, "LINK", "is not set"),
    ({"BRIDGE": "a b"}, "BRIDGE", "contains ' '"),
    ({"IP": "192.0.2.300"}, "IP", "not an IPv4 or IPv6 address"),
    ({"IP": "fe80::1%eth0"}, "IP", "has a scope"),
    ({"IP": "224.0.0.1"}, "IP", "not a unicast address"),
    ({"IP": "0.0.0.0"}, "IP", "not a unicast address"),
    ({"IP": "$(reboot)"}, "IP", "not an IPv4 or IPv6 address"),
    ({"VLAN": ".abc"}, "VLAN", "'abc' is not a VLAN id"),
    ({"VLAN": ".4095"}, "VLAN", "VLAN id 4095 is out of range 1..4094"),
    ({"VLAN": "::"}, "VLAN", "empty VLAN id"),
    ({"INTERFACE_UUID": "not-a-uuid"}, "INTERFACE_UUID", "is not a UUID"),
    ({"INTERFACE_UUID": "6b1a2c3d4e5f4a6b8c7d9e0f1a2b3c4d"}, "INTERFACE_UUID", "8-4-4-4-12"),
    ({"INTERFACE_UUID": "../../etc/passwd"}, "INTERFACE_UUID", "is not a UUID"),
    ({"INTERFACE_INDEX": "-1"}, "INTERFACE_INDEX", "not a NIC index"),
    ({"INTERFACE_INDEX": "one"}, "INTERFACE_INDEX", "not a NIC index"),
    ({"INSTANCE": "web1;rm -rf /"}, "INSTANCE", "is not an instance name"),
    ({"INSTANCE": "-web"}, "INSTANCE", "is not an instance name"),
    ({"TAGS": "ok bad|tag"}, "TAGS", "is not a valid Ganeti tag"),
    ({"INTERFACE_NAME": "eth\x1b[31m"}, "INTERFACE_NAME", "control character"),
    ({"NETWORK_SUBNET": "2001:db8::/64"}, "NETWORK_SUBNET", "not an IPv4 network"),
    ({"NETWORK_SUBNET": "192.0.2.0/33"}, "NETWORK_SUBNET", "not a network"),
    ({"NETWORK_SUBNET6": "192.0.2.0/24"}, "NETWORK_SUBNET6", "not an IPv6 network"),
    ({"NETWORK_GATEWAY": "2001:db8::1"}, "NETWORK_GATEWAY", "not an IPv4 address"),
    ({"NETWORK_GATEWAY6": "192.0.2.1"}, "NETWORK_GATEWAY6", "not an IPv6 address"),
    ({"NETWORK_UUID": "x"}, "NETWORK_UUID", "is not a UUID"),
    ({"NETWORK_TAGS": "a\tb$c"}, "NETWORK_TAGS", "not a valid Ganeti tag"),
    ({"NETWORK_MAC_PREFIX": "aa:00"}, "NETWORK_MAC_PREFIX", "not a MAC prefix"),
    ({"MIGRATION_PHASE": "during"}, "MIGRATION_PHASE", "is not 'pre' or 'post'"),
    ({"ACTION": "sideways"}, "ACTION", "is not 'up' or 'down'"),
])
def test_invalid_input_names_the_variable(overrides: dict[str, str | None], variable: str,
                                          fragment: str) -> None:
    assert fragment, "an empty fragment is in every message: the case would check nothing"
    with pytest.raises(InvalidInput) as info:
        nic_from_variables(ganeti_env(**overrides), tap=None)
    assert info.value.variable == variable
    assert fragment in info.value.problem
    line = info.value.line()
    assert line.startswith(f"nichooks: {variable}: ") and "\n" not in line
    assert info.value.exit_status == 2


def test_routed_rejects_vlan_and_bad_table() -> None:
    with pytest.raises(InvalidInput, match="VLAN"):
        nic_from_variables(ganeti_env(MODE="routed", VLAN=".5"), tap=None)
    with pytest.raises(InvalidInput, match="out of range"):
        nic_from_variables(ganeti_env(MODE="routed", LINK="4294967296"), tap=None)
    with pytest.raises(InvalidInput, match="neither a table number"):
        nic_from_variables(ganeti_env(MODE="routed", LINK="9table"), tap=None)


def test_argv_tap_used_only_without_interface() -> None:
    nic = nic_from_variables(ganeti_env(INTERFACE=None), tap="tap9")
    assert nic.tap == "tap9"
    with pytest.raises(InvalidInput) as info:
        nic_from_variables(ganeti_env(INTERFACE=None), tap="bad/tap")
    assert info.value.variable == "argument TAP"
    with pytest.raises(InvalidInput) as info:
        nic_from_variables(ganeti_env(INTERFACE=None), tap=None)
    assert info.value.variable == "INTERFACE"


@pytest.mark.parametrize(("raw4", "raw6"), [
    (" 192.0.2.1", "2001:db8:1::1 "),
    ("192.0.2.1\n", "\t2001:DB8:1:0:0::1"),
])
def test_gateways_are_used_as_validated_not_as_given(raw4: str, raw6: str) -> None:
    """The check trims and normalises: the value the plan uses must be that one, or a
    padded gateway passes validation and fails half-way through a routed plug."""
    nic = nic_from_variables(ganeti_env(NETWORK_GATEWAY=raw4, NETWORK_GATEWAY6=raw6))
    assert nic.network.gateway == "192.0.2.1"
    assert nic.network.gateway6 == "2001:db8:1::1"
