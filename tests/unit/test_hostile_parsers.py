"""Hostile input straight into every parser and validator (issue 6, item 5, the
in-process half; tests/integration/test_hostile.py drives the same inputs through
the hooks themselves).

Each property: the function returns, or raises InvalidInput (CorruptJournal for the
journal) naming what was wrong - never any other exception, which a hook would turn
into "internal error" - and what it accepts is safe to use afterwards: a device name
the kernel takes, a journal key that is a file name in nics/, a path component that
stays in its directory, an address that is unicast and unscoped. Example counts are
the N_* constants; no privileges needed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nichooks import settings as settingsmod
from nichooks.callers import xen
from nichooks.callers.shellvars import MAX_FILE, read_assignments
from nichooks.callers.xen_vif import backend_path
from nichooks.engine.journal import CorruptJournal, Journal, check_key
from nichooks.errors import InvalidInput
from nichooks.model import nic as nicmod
from nichooks.model import validate
from nichooks.model.vlan import parse_vlan
from nichooks.modes.registry import nic_from_variables
from tests.unit.test_shellvars import bash_own_names, bash_source

N_TEXT = 400        # per validator: arbitrary and trap-laden text
N_NIC = 400         # whole hostile environments into nic.from_variables
N_SETTINGS = 300    # hostile settings into settings.load
N_JOURNAL = 400     # arbitrary JSON into Journal.from_json
N_SPEC = 400        # hostile spec/NIC files through shellvars.read_assignments (and bash)

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
COMMON = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
UUID = "6b1a2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"

TRAPS = ["", ".", "..", "/", "../../etc/passwd", "a/b", "tap 0", "tap\n0", "tap0\n", "\ttap0",
         "tap:0", "a" * 16, "é" * 8, "tap\udcff", "tap\x7f", "²", "١٢", "9" * 5000, "0" * 5000 + "1",
         "-1", "+1", " 1", "0x10", "1e3", "nan", "inf", "1_000", "4294967296", "0",
         "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "aa:00:00:12:34:５６",
         "fe80::1%eth0", "2001:db8::%eth0/64", "::ffff:192.0.2.1", "255.255.255.255", "0.0.0.0",
         "224.0.0.1", "::1", "192.0.2.1/24", "10.0.0.0/8%x", UUID.upper(), "{" + UUID + "}",
         "urn:uuid:" + UUID, UUID + "-emu", "../" + UUID, "０" * 32, ".0", ".4095", ".100:100",
         "9" * 30000, "$(touch /tmp/x)", "`id`", ";reboot", "|id", "&&id", "${IFS}", "~root"]
text = st.one_of(
    st.sampled_from(TRAPS),
    st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from(["\udcff", "\udc80"]),
            max_size=30),
    st.builds(lambda a, b: a + b, st.sampled_from(TRAPS), st.text(max_size=8)),
)
NAME_OK = re.compile(r"[\x21-\x7e]{1,15}")


def only_invalid_input(fn: Any, *args: Any) -> Any:
    """Call fn; InvalidInput means refused (returns None); anything else fails."""
    try:
        return fn(*args)
    except InvalidInput as exc:
        assert "\n" not in str(exc).replace("\\n", ""), f"a multi-line error: {exc}"
        return None


# -- one validator at a time ------------------------------------------------------------
@settings(max_examples=N_TEXT, **COMMON)
@given(value=text)
def test_ifname(value: str) -> None:
    name = only_invalid_input(validate.ifname, "X", value)
    if name is not None:
        assert NAME_OK.fullmatch(name) and name not in (".", "..")
        assert not any(c in name for c in "/:") and name == value


@settings(max_examples=N_TEXT, **COMMON)
@given(value=text)
def test_mac(value: str) -> None:
    mac = only_invalid_input(validate.mac, "MAC", value)
    if mac is not None:
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac)
        assert not int(mac[:2], 16) & 1 and mac != "00:00:00:00:00:00"


@st.composite
def macs(draw: st.DrawFn) -> str:
    octets = draw(st.lists(st.integers(0, 255), min_size=6, max_size=6))
    sep = draw(st.sampled_from([":", ":", "-", ""]))
    return sep.join(f"{o:02X}" if draw(st.booleans()) else f"{o:02x}" for o in octets)


@settings(max_examples=N_TEXT, **COMMON)
@given(value=macs())
def test_mac_group_bit_always_refused(value: str) -> None:
    mac = only_invalid_input(validate.mac, "MAC", value)
    first = int(value[:2], 16)
    if first & 1 or set(value) <= set("0:-"):
        assert mac is None, value


@settings(max_examples=N_TEXT, **COMMON)
@given(value=st.one_of(text, st.ip_addresses().map(str),
                       st.builds(lambda a, s: f"{a}%{s}", st.ip_addresses(v=6), st.text(max_size=6))))
def test_ip_address(value: str) -> None:
    addr = only_invalid_input(validate.ip_address, "IP", value)
    if addr is not None:
        assert "%" not in value and "%" not in str(addr)
        assert not (addr.is_multicast or addr.is_unspecified or addr.is_loopback)
        assert addr != ipaddress.IPv4Address("255.255.255.255")
        assert not (addr.version == 6 and addr.ipv4_mapped)


@settings(max_examples=N_TEXT, **COMMON)
@given(value=st.one_of(text, st.builds(lambda a, p, s: f"{a}{s}/{p}", st.ip_addresses(),
                                       st.integers(-1, 130), st.sampled_from(["", "%eth0", "%1"]))),
       version=st.sampled_from([4, 6]))
def test_ip_network(value: str, version: int) -> None:
    net = only_invalid_input(validate.ip_network, "NETWORK_SUBNET", value, version)
    if net is not None:
        assert net.version == version and "%" not in str(net)


@settings(max_examples=N_TEXT, **COMMON)
@given(value=st.one_of(text, st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()),
                       st.uuids().map(lambda u: u.hex), st.uuids().map(lambda u: f" {u}\n")))
def test_uuid_is_always_a_journal_key(value: str) -> None:
    key = only_invalid_input(validate.uuid, "INTERFACE_UUID", value)
    if key is not None:
        assert check_key(key) == key  # a file name in nics/, nothing more


@settings(max_examples=N_TEXT, **COMMON)
@given(value=text)
def test_index_table_instance_tags_text(value: str) -> None:
    index = only_invalid_input(validate.index, "INTERFACE_INDEX", value)
    if index is not None:
        assert re.fullmatch(r"[0-9]{1,6}", value) and 0 <= index < 10**6
    table = only_invalid_input(validate.table, "LINK", value)
    if table is not None:
        assert (table.isascii() and table.isdigit() and 0 < int(table) < 2**32) \
            or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", table)
    instance = only_invalid_input(validate.instance, "INSTANCE", value)
    if instance is not None:  # a path component (Xen NIC files) that stays put
        assert "/" not in instance and instance not in (".", "..") and len(instance) <= 255
        assert instance.isascii() and instance.isprintable()
    tags = only_invalid_input(validate.tags, "TAGS", value)
    if tags is not None:
        assert all(t and t.isascii() and t.isprintable() and " " not in t for t in tags)
    free = only_invalid_input(validate.free_text, "INTERFACE_NAME", value)
    if free is not None:
        assert "\n" not in free and "\r" not in free
    prefix = only_invalid_input(validate.mac_prefix, "NETWORK_MAC_PREFIX", value)
    if prefix is not None:
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){2}", prefix)


@settings(max_examples=N_TEXT, **COMMON)
@given(value=st.one_of(text, st.text("0123456789.:", max_size=20)))
def test_vlan(value: str) -> None:
    spec = only_invalid_input(parse_vlan, value, "VLAN")
    if spec is not None:
        assert parse_vlan(spec.canonical(), "VLAN") == spec
        assert all(1 <= v <= 4094 for v in (*spec.trunks, *([spec.access] if spec.access else [])))


@settings(max_examples=N_TEXT, **COMMON)
@given(value=st.one_of(text, st.from_regex(r"vif[0-9]{1,6}\.[0-9]{1,6}", fullmatch=True)))
def test_xen_vif_names(value: str) -> None:
    found = only_invalid_input(xen.parse_vif, value)
    if found is not None:
        assert value == f"vif{found[0]}.{found[1]}" or re.fullmatch(r"vif0*[0-9]+\.0*[0-9]+", value)
        assert len(value) <= 15


@settings(max_examples=N_TEXT, **COMMON)
@given(value=st.one_of(text, st.just("backend/vif/5/0"), st.just("/local/domain/0/backend/vif/5/0")))
def test_xenbus_path(value: str) -> None:
    path = only_invalid_input(backend_path, {"XENBUS_PATH": value})
    if path:
        assert not path.startswith("-") and ".." not in path.split("/")
        assert path.isascii() and path.isprintable() and " " not in path


# -- a whole environment --------------------------------------------------------------------
NIC_NAMES = nicmod.GANETI_VARS
VALID = {"INSTANCE": "vm1.example.org", "MAC": "aa:00:00:12:34:56", "MODE": "bridged", "LINK": "br0",
         "INTERFACE": "tap0", "INTERFACE_UUID": UUID, "IP": "192.0.2.10", "VLAN": "",
         "NETWORK_SUBNET6": "2001:db8::/64"}


@settings(max_examples=N_NIC, **COMMON)
@given(changes=st.dictionaries(st.sampled_from(NIC_NAMES), text, min_size=1, max_size=4),
       tap=st.one_of(st.none(), text), drop=st.lists(st.sampled_from(sorted(VALID)), max_size=2))
def test_nic_from_hostile_variables(changes: dict[str, str], tap: str | None, drop: list[str]) -> None:
    env = {**VALID, **changes}
    for name in drop:
        env.pop(name, None)
    nic = only_invalid_input(lambda: nic_from_variables(env, tap=tap))
    if nic is None:
        return
    assert check_key(nic.key) == nic.key
    assert validate.ifname("INTERFACE", nic.tap) == nic.tap
    if nic.mode in ("bridged", "openvswitch"):
        assert nic.link is not None and validate.ifname("LINK", nic.link) == nic.link
    if nic.link is not None:
        assert "\n" not in nic.link
    assert validate.mac("MAC", nic.mac) == nic.mac
    for value in (nic.network.subnet, nic.network.subnet6, nic.network.gateway, nic.network.gateway6):
        assert value is None or "%" not in value
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in nic.variables.items())


# -- settings ------------------------------------------------------------------------------------
SETTING_NAMES = tuple(settingsmod.DEFAULTS)


@settings(max_examples=N_SETTINGS, **COMMON)
@given(changes=st.dictionaries(st.sampled_from(SETTING_NAMES), st.one_of(
    text, st.sampled_from(["/" + "a" * 300, "/a" * 2100, "/tmp/x\ny", "/etc/passwd", "/etc/passwd/x",
                           "relative", "/nonexistent-nichooks/state"])), min_size=1, max_size=3))
def test_settings_from_a_hostile_environment(tmp_path: Path, changes: dict[str, str]) -> None:
    env = {"NICHOOKS_CONF_DIR": str(tmp_path / "conf"), "NICHOOKS_STATE_DIR": str(tmp_path / "state"),
           **changes}
    if "\x00" in "".join(env.values()):
        return  # an environment cannot carry NUL
    loaded = only_invalid_input(settingsmod.load, env)
    if loaded is None:
        return
    for path in (loaded.state_dir, loaded.conf_dir, loaded.ganeti_run_dir, loaded.ovs_rundir,
                 loaded.iproute2_dir):
        assert path.is_absolute() and "\n" not in str(path) and len(os.fsencode(str(path))) < 4096
    assert 1 <= loaded.rule_priority <= 32765 and 5 <= loaded.route_proto <= 255
    assert 0 < loaded.lock_timeout <= 3600 and loaded.antispoof in ("on", "mac", "off")
    for uplink in (loaded.uplink4, loaded.uplink6):
        assert uplink is None or validate.ifname("U", uplink) == uplink


@settings(max_examples=N_SETTINGS, **COMMON)
@given(content=st.one_of(st.binary(max_size=200), st.lists(st.one_of(
    st.sampled_from(["[nichooks]", "[other]", "[nichooks", "%(x)s", "  continued", "= x"]),
    st.builds(lambda n, v: f"{n} = {v}", st.sampled_from(SETTING_NAMES), text)), max_size=5).map(
    lambda lines: "\n".join(lines).encode("utf-8", "surrogateescape"))))
def test_settings_from_a_hostile_file(tmp_path: Path, content: bytes) -> None:
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "nichooks.conf").write_bytes(content)
    env = {"NICHOOKS_CONF_DIR": str(conf), "NICHOOKS_STATE_DIR": str(tmp_path / "state")}
    loaded = only_invalid_input(settingsmod.load, env)
    if loaded is not None:
        assert loaded.state_dir == tmp_path / "state"  # the environment wins
        assert only_invalid_input(settingsmod.effective, env) is not None


@pytest.mark.parametrize("kind", ["directory", "fifo", "loop", "dangling"])
def test_settings_file_of_the_wrong_kind(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nichooks.conf"
    {"directory": lambda: path.mkdir(), "fifo": lambda: os.mkfifo(path),
     "loop": lambda: os.symlink(path.name, path), "dangling": lambda: os.symlink("nowhere", path)}[kind]()
    env = {"NICHOOKS_CONF_DIR": str(tmp_path), "NICHOOKS_STATE_DIR": str(tmp_path / "state")}
    only_invalid_input(settingsmod.load, env)  # and never blocks on the FIFO


# -- journals ---------------------------------------------------------------------------------------
def _journal(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"format": 1, "key": UUID, "tap": "tap0", "mode": "bridged",
                            "instance": "vm1", "link": "br0", "ifindex": 7, "context": "start",
                            "state": "applied", "created": 1.0, "variables": {}, "deferred": [],
                            "records": [{"kind": "link.attr", "undo": {"ifindex": 7}, "step": "s"}]}
    data.update(over)
    return data


# Integers beyond what float() takes included: a journal with one is corrupt, not a crash.
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(10**300, 10**400), st.floats(), text),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(text, st.sampled_from(sorted(_journal()))), inner,
                                            max_size=4)),
    max_leaves=10)


@settings(max_examples=N_JOURNAL, **COMMON)
@given(field=st.sampled_from(sorted(_journal())), value=json_values, whole=st.booleans())
def test_journal_from_hostile_json(field: str, value: Any, whole: bool) -> None:
    data = value if whole else _journal(**{field: value})
    try:
        journal = Journal.from_json(json.loads(json.dumps(data)))
    except CorruptJournal:
        return
    assert check_key(journal.key) == journal.key
    assert all(isinstance(r.undo, dict) and isinstance(r.kind, str) for r in journal.records)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in journal.variables.items())


def test_journal_with_a_huge_number() -> None:
    with pytest.raises(CorruptJournal):
        Journal.from_json(json.loads(json.dumps(_journal(created=10**400))))


def test_journal_nested_too_deep(tmp_path: Path) -> None:
    from nichooks.engine.store import Store

    store = Store(tmp_path)
    store.ensure()
    store.path(UUID).write_text("[" * 100_000)
    with pytest.raises(CorruptJournal):
        store.load(UUID)


# -- spec files and Xen NIC files --------------------------------------------------------------------
# Shell syntax: mostly what a NIC file may hold (quoting, escapes, tildes, braces,
# globs, comments), some of what it may not (expansions, operators, a lone quote).
SHELL_TOKENS = ["a", "x", "1", " ", "\t", "\n", "~", ":", ":~", "~/", "=", "#", "*", "{a,b}",
                "\\x", "\\ ", "\\\\", "\\'", '\\"', "\\$", "\\\n", "\\~", "'a b'", "'$x'", "'\\'", '"a b"',
                '"\\ "', '"\\x"', '"\\$"', '"\\\\"', '"~"',
                "$x", "`x`", ";", "&", "|", "<", ">", "(", ")", "'", '"', "\\"]
shellish = st.lists(st.sampled_from(SHELL_TOKENS), max_size=8).map("".join)
# A value from the traps above, bare, put between quotes as is (so a quote, a
# backslash or a `$` in it means whatever bash makes of it), or quoted properly.
values = st.one_of(text, st.builds(lambda q, v: q + v + q, st.sampled_from(["'", '"']), text),
                   text.map(lambda v: "'" + v.replace("'", "'\\''") + "'"))


def _file(lines: list[str]) -> bytes:
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def _assignments(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda n, v: f"{n}={v}", st.sampled_from(NIC_NAMES), values)


@settings(max_examples=N_SPEC, **COMMON)
@given(content=st.one_of(
    st.binary(max_size=120),
    st.lists(st.one_of(_assignments(values), text), max_size=6).map(_file),
    st.lists(_assignments(shellish), min_size=1, max_size=3).map(_file),
    _assignments(shellish).map(lambda line: line.encode())))
def test_read_assignments_of_hostile_bytes(tmp_path: Path, content: bytes) -> None:
    """Refused with InvalidInput, or read as exactly the variables bash sets when it
    sources the same bytes, having run nothing (the sandboxed bash of test_shellvars
    is the oracle)."""
    path = tmp_path / "nic"
    path.write_bytes(content)
    result = only_invalid_input(read_assignments, path)
    if result is None:
        return
    assume(not set(result) & bash_own_names())  # PATH=, RANDOM=...: bash's own, not comparable
    assert result == bash_source(content)


@pytest.mark.parametrize("kind", ["directory", "fifo", "loop", "dangling", "big", "binary", "device"])
def test_read_assignments_of_files_of_the_wrong_kind(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nic"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "loop":
        os.symlink(path.name, path)
    elif kind == "dangling":
        os.symlink("nowhere", path)
    elif kind == "big":
        path.write_bytes(b"A=1\n" * (MAX_FILE // 4 + 1))
    elif kind == "binary":
        path.write_bytes(b"MAC=\xff\xfe\n")
    else:
        os.symlink("/dev/zero", path)
    result = only_invalid_input(read_assignments, path)
    assert result is None  # refused (or, dangling: absent), never blocking, never read forever
