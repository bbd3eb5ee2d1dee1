"""Ganeti VLAN syntax: every shape Ganeti documents (the gnt-instance man page)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nichooks.errors import InvalidInput
from nichooks.model.vlan import MAX_TEXT_LEN, VlanSpec, parse_vlan

# (text, access, trunks, ovs_vlan_mode, canonical)
VALID = [
    # the shapes Ganeti documents
    ("", None, None, None, None),
    (".100", 100, (), "access", ".100"),
    ("100", 100, (), "access", ".100"),  # create normalises it to .100; modify does not
    (":100:200", None, (100, 200), "trunk", ":100:200"),
    (".100:200:300", 100, (200, 300), "native-untagged", ".100:200:300"),
    # man page shapes: access n / .n, trunk :n[:n...], hybrid .n:n[:n...]
    (":100", None, (100,), "trunk", ":100"),
    (".100:200", 100, (200,), "native-untagged", ".100:200"),
    ("100:200", 100, (200,), "native-untagged", ".100:200"),  # unvalidated modify
    ("100:200:300", 100, (200, 300), "native-untagged", ".100:200:300"),
    # limits and normalisation
    (".1", 1, (), "access", ".1"),
    (".4094", 4094, (), "access", ".4094"),
    (":1:4094", None, (1, 4094), "trunk", ":1:4094"),
    (".0100", 100, (), "access", ".100"),
    (":300:200:300:200", None, (300, 200), "trunk", ":300:200"),  # order kept
    (".5:7:7", 5, (7,), "native-untagged", ".5:7"),
]


@pytest.mark.parametrize(("text", "access", "trunks", "mode", "canonical"), VALID)
def test_parse_valid(
    text: str, access: int | None, trunks: tuple[int, ...] | None, mode: str | None, canonical: str | None
) -> None:
    spec = parse_vlan(text)
    if trunks is None:
        assert spec is None
        return
    assert spec == VlanSpec(access, trunks)
    assert spec.ovs_vlan_mode == mode
    assert spec.canonical() == canonical
    assert parse_vlan(spec.canonical()) == spec


INVALID = [
    (".", "empty"),
    ("..", "not a VLAN id"),
    ("..100", "not a VLAN id"),
    (".:", "empty"),
    (".:100", "empty"),
    (":", "empty"),
    ("::", "empty"),
    ("::100", "empty"),
    (":100::200", "empty"),
    ("100:", "empty"),
    (".100:", "empty"),
    (":100:", "empty"),
    (".100.200", "not a VLAN id"),
    ("100.", "not a VLAN id"),
    (":.100", "not a VLAN id"),
    (".100:.200", "not a VLAN id"),
    (" 100", "not a VLAN id"),
    ("100 ", "not a VLAN id"),
    ("+100", "not a VLAN id"),
    ("-1", "not a VLAN id"),
    ("0x10", "not a VLAN id"),
    ("1_000", "not a VLAN id"),
    ("١٠٠", "not a VLAN id"),  # Arabic-Indic digits: int() would accept them
    ("100,200", "not a VLAN id"),
    ("br0.100", "not a VLAN id"),
    (".0", "out of range 1..4094"),
    ("0", "out of range 1..4094"),
    (".4095", "out of range 1..4094"),
    (":100:5000", "out of range 1..4094"),
    ("." + "9" * 5000, "out of range 1..4094"),  # beyond int()'s digit limit
    (".100:100", "both untagged and tagged"),
    ("100:200:100", "both untagged and tagged"),
]


@pytest.mark.parametrize(("text", "problem"), INVALID)
def test_parse_invalid(text: str, problem: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_vlan(text)
    assert exc.value.variable == "VLAN"
    assert problem in exc.value.problem


def test_error_names_the_variable() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_vlan("x", variable="/run/nichooks/specs/tap0:4")
    assert exc.value.variable == "/run/nichooks/specs/tap0:4"
    assert exc.value.exit_status == 2


def test_too_long() -> None:
    every_id = ":" + ":".join(str(v) for v in range(1, 4095))
    assert len(every_id) <= MAX_TEXT_LEN
    spec = parse_vlan(every_id)
    assert spec is not None and len(spec.trunks) == 4094
    with pytest.raises(InvalidInput, match="too long"):
        parse_vlan(":1" * (MAX_TEXT_LEN // 2 + 1))


@pytest.mark.parametrize(
    ("access", "trunks"),
    [(0, ()), (4095, ()), (None, (0,)), (5, (5,)), (None, (7, 7)), (True, ()), (None, [1])],
)
def test_constructor_keeps_invariants(access: object, trunks: object) -> None:
    with pytest.raises(ValueError):
        VlanSpec(access, trunks)  # type: ignore[arg-type]


def test_no_vlan_spec() -> None:
    empty = VlanSpec(None, ())
    assert empty.ovs_vlan_mode is None
    assert empty.canonical() == ""
    assert parse_vlan(empty.canonical()) is None


def test_frozen() -> None:
    spec = VlanSpec(100, ())
    with pytest.raises(AttributeError):
        spec.access = 5  # type: ignore[misc]


vids = st.integers(min_value=1, max_value=4094)


@st.composite
def specs(draw: st.DrawFn) -> VlanSpec:
    access = draw(st.none() | vids)
    trunks = draw(st.lists(vids.filter(lambda v: v != access), unique=True, max_size=20))
    spec = VlanSpec(access, tuple(trunks))
    if spec.access is None and not spec.trunks:
        spec = VlanSpec(draw(vids), ())
    return spec


@given(specs())
def test_round_trip(spec: VlanSpec) -> None:
    assert parse_vlan(spec.canonical()) == spec


@given(st.text(alphabet=".:0123456789 x", max_size=30))
def test_only_invalid_input_escapes(text: str) -> None:
    try:
        spec = parse_vlan(text)
    except InvalidInput:
        return
    if spec is not None:
        assert parse_vlan(spec.canonical()) == spec
