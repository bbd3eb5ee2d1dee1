"""Repair rebuilds each step from its own record: the rules the plan applies hold for
the rebuilt steps too (no flows where a controller filters, no host-wide sysctl
written against NICHOOKS_MANAGE_SYSCTLS), entries someone else had made are put back
when they vanish, and `status` checks records whose undo failed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from nichooks import settings as settingsmod
from nichooks.engine import records as kinds
from nichooks.engine.journal import Record, Status
from nichooks.errors import InvalidInput, PlumbingError
from nichooks.host.ovsdb import BridgeInfo
from nichooks.host.steps.routing import GATEWAY6, UPSTREAM, ProxyNeigh
from nichooks.modes import registry

SETTINGS = settingsmod.load({"NICHOOKS_CONF_DIR": "/nonexistent/nichooks-test-conf"})
NIC = registry.nic_from_variables({"MODE": "openvswitch", "MAC": "aa:00:00:00:00:01",
                                   "INTERFACE": "tap0", "LINK": "br0", "IP": "192.0.2.10",
                                   "INTERFACE_UUID": "6b1a2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"})


@dataclass
class FakeOvsdb:
    bridges: dict[str, BridgeInfo] = field(default_factory=dict)

    def bridge(self, name: str) -> BridgeInfo | None:
        return self.bridges.get(name)


@dataclass
class FakeHost:
    settings: settingsmod.Settings
    db: FakeOvsdb = field(default_factory=FakeOvsdb)

    def ovsdb(self) -> FakeOvsdb:
        return self.db


def flows_record() -> Record:
    from nichooks.host.openflow import cookie

    return Record(kind="ovs.flows", step="anti-spoofing flows", undo={"bridge": "br0",
                                                                     "cookie": cookie(NIC.key)})


@pytest.mark.parametrize("fail_mode,controllers,rebuilt", [
    (None, (), True),
    ("secure", (), False),
    (None, ("tcp:192.0.2.1:6653",), False),
])
def test_flows_are_not_put_back_where_a_controller_filters(
        fail_mode: str | None, controllers: tuple[str, ...], rebuilt: bool) -> None:
    host = FakeHost(SETTINGS)
    host.db.bridges["br0"] = BridgeInfo(name="br0", fail_mode=fail_mode, controllers=controllers,
                                        datapath_type="netdev", mtu=1500)
    step = kinds.rebuild(flows_record(), NIC, host)
    assert (step is not None) is rebuilt
    if step is not None:
        assert step.as_data()["ipv4"] == ["192.0.2.10"]


def test_flows_are_not_put_back_with_anti_spoofing_off() -> None:
    host = FakeHost(replace(SETTINGS, antispoof="off"))
    assert kinds.rebuild(flows_record(), NIC, host) is None


@pytest.mark.parametrize("manage", [True, False])
def test_shared_sysctl_is_rewritten_only_when_the_operator_allows_it(manage: bool) -> None:
    host = FakeHost(replace(SETTINGS, manage_sysctls=manage))
    # A device no namespace has: were the rule broken, the write would fail with
    # FileNotFoundError, never reach a real sysctl of the machine running the tests.
    key = "net/ipv4/conf/nh-no-such-dev/forwarding"
    record = Record(kind="sysctl.shared", step="sysctl forwarding=1 (shared)",
                    undo={"key": key, "old": "0", "new": "1"})
    step = kinds.rebuild(record, NIC, host)
    assert step is not None and step.as_data()["value"] == "1"
    if manage:
        with pytest.raises(FileNotFoundError):
            step.apply(host)  # it tried to write: allowed
        return
    with pytest.raises(PlumbingError, match=r"routed mode needs: sysctl -w "
                       r"net\.ipv4\.conf\.nh-no-such-dev\.forwarding=1"):
        step.apply(host)


@pytest.mark.parametrize("dev,why", [("tap0", GATEWAY6), ("eth0", UPSTREAM)])
def test_a_proxy_entry_someone_else_made_is_put_back(dev: str, why: str) -> None:
    record = Record(kind="route.proxy", step="ip neigh add proxy", undo={
        "addr": "2001:db8::1", "dev": dev, "ifindex": 3, "proto": 241, "foreign": True})
    assert kinds.rebuild(record, NIC, FakeHost(SETTINGS)) == ProxyNeigh("2001:db8::1", dev, 241, why)


def test_a_record_whose_undo_failed_is_still_checked() -> None:
    seen: list[dict[str, Any]] = []
    kinds.checks("test.checked")(lambda net, undo: seen.append(undo) is None)
    try:
        record = Record(kind="test.checked", step="x", undo={"n": 1}, status=Status.FAILED)
        assert kinds.present(object(), record) is True and seen == [{"n": 1}]
    finally:
        del kinds.KINDS["test.checked"]


@pytest.mark.parametrize("env,variable", [
    ({"MODE": "bridged", "IP": "not-an-ip"}, "LINK"),            # LINK before IP, as always
    ({"MODE": "routed", "VLAN": "5", "MIGRATION_PHASE": "x"}, "VLAN"),
    ({"MODE": "bridged", "LINK": "a" * 20, "IP": "bad"}, "LINK"),
    ({"MODE": "routed", "LINK": "9table"}, "LINK"),
])
def test_mode_rules_are_reported_where_link_and_vlan_are_read(env: dict[str, str],
                                                              variable: str) -> None:
    base = {"MAC": "aa:00:00:00:00:01", "INTERFACE": "tap0"}
    with pytest.raises(InvalidInput) as caught:
        registry.nic_from_variables({**base, **env})
    assert caught.value.variable == variable
