"""The Xen source in-process: xenstore and xl faked with pytest-subprocess (they do
not exist here), Ganeti's NIC file parsed as bash sources it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_subprocess import FakeProcess

from nichooks.callers import xen
from nichooks.errors import InvalidInput, PlumbingError
from nichooks.modes.registry import nic_from_variables as from_variables

ENV = {"PATH": "/nonexistent"}


@pytest.fixture(autouse=True)
def tools_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xen.shutil, "which", lambda name, path=None: f"/usr/sbin/{name}")


def test_vif_names() -> None:
    assert xen.parse_vif("vif5.0") == (5, 0)
    assert xen.parse_vif("vif123.7") == (123, 7)
    for bad in ("vif5", "eth0", "vif5.0-emu", "vifa.b"):
        with pytest.raises(InvalidInput):
            xen.parse_vif(bad)


def test_domain_name_strips_incoming(fp: FakeProcess) -> None:
    fp.register(["/usr/sbin/xl", "domname", "5"], stdout="web1.example.org--incoming\n")
    assert xen.domain_name(5, ENV) == ("web1.example.org", True)
    fp.register(["/usr/sbin/xl", "domname", "6"], stdout="web2.example.org\n")
    assert xen.domain_name(6, ENV) == ("web2.example.org", False)
    fp.register(["/usr/sbin/xl", "domname", "7"], returncode=1,
                stderr="Can't get domain name of domain id '7'\n")
    with pytest.raises(PlumbingError, match="xl domname 7"):
        xen.domain_name(7, ENV)


def test_xenstore_read_and_write(fp: FakeProcess) -> None:
    fp.register(["/usr/sbin/xenstore-read", "backend/vif/5/0/mac"], stdout="aa:00:00:00:00:01\n")
    fp.register(["/usr/sbin/xenstore-read", "backend/vif/5/0/vifname"], returncode=1)
    store = xen.XenStore(ENV)
    assert store.read("backend/vif/5/0/mac") == "aa:00:00:00:00:01"
    assert store.read("backend/vif/5/0/vifname") is None
    fp.register(["/usr/sbin/xenstore-write", "a", "1", "b", "two words"])
    store.write(("a", "1"), ("b", "two words"))
    assert ["/usr/sbin/xenstore-write", "a", "1", "b", "two words"] in fp.calls


def test_xenstore_fallback_for_ovs_with_vlan_and_routed(fp: FakeProcess) -> None:
    base = "backend/vif/5/0"
    fp.register(["/usr/sbin/xenstore-read", f"{base}/mac"], stdout="aa:00:00:00:00:01\n",
                occurrences=2)
    fp.register(["/usr/sbin/xenstore-read", f"{base}/ip"], stdout="192.0.2.5\n", occurrences=2)
    fp.register(["/usr/sbin/xenstore-read", f"{base}/bridge"], stdout="nosuchbr.100:200\n")
    out = xen.from_xenstore(xen.XenStore(ENV), base)
    assert out == {"MAC": "aa:00:00:00:00:01", "IP": "192.0.2.5", "MODE": "openvswitch",
                   "LINK": "nosuchbr", "VLAN": ".100:200"}
    fp.register(["/usr/sbin/xenstore-read", f"{base}/bridge"], returncode=1)
    assert xen.from_xenstore(xen.XenStore(ENV), base)["MODE"] == "routed"


def test_nic_file_as_ganeti_writes_it(tmp_path: Path) -> None:
    path = xen.nic_file(tmp_path, "inst1", 1)
    path.parent.mkdir(parents=True)
    path.write_text('TAGS="a\\ b\\ c"\nNETWORK_NAME="net one"\nNETWORK_SUBNET="10.0.0.0/24"\n'
                    "MAC=aa:00:00:00:00:01\nIP=10.0.0.5\nINTERFACE_INDEX=1\nINTERFACE_NAME=eth1\n"
                    "INTERFACE_UUID=9d1c3b2a-5e4f-4a3b-8c2d-1e0f9a8b7c6d\nMODE=openvswitch\n"
                    "LINK=br0\nVLAN=.100:200\n")
    variables = xen.read_nic_file(path)
    assert variables is not None
    assert variables["TAGS"] == "a\\ b\\ c"  # what bash would hold
    nic = from_variables({**variables, "INSTANCE": "inst1", "INTERFACE": "vif5.1"})
    assert nic.tags == ("a", "b", "c")
    assert nic.variables["TAGS"] == "a b c"  # what custom scripts get, as on KVM
    assert nic.vlan is not None and nic.vlan.canonical() == ".100:200"
    assert nic.network.name == "net one"
    assert xen.read_nic_file(tmp_path / "missing") is None
