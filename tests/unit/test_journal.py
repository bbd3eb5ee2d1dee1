"""The journal survives crashes: a reader sees the old or the new file, never half."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nichooks.engine.journal import CorruptJournal, Journal, Record, check_key
from nichooks.engine.store import Store
from nichooks.errors import InvalidInput, PlumbingError
from nichooks.model.validate import ifname

KEY = "6b1a2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def journal(records: int = 2) -> Journal:
    return Journal(key=KEY, tap="tap0", mode="bridged", instance="vm1", link="br0", ifindex=7,
                   context="start", variables={"MODE": "bridged"},
                   records=[Record(kind="link.attr", undo={"ifindex": 7, "n": i}, step=f"s{i}")
                            for i in range(records)])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state")
    s.ensure()
    return s


def test_roundtrip_and_layout(store: Store) -> None:
    saved = journal()
    store.save(saved)
    assert os.listdir(store.nics) == [f"{KEY}.json"]
    assert os.listdir(store.tmp) == []
    loaded = store.load(KEY)
    assert loaded is not None and loaded.to_json() == saved.to_json()
    assert store.journal_keys() == [KEY]


def test_crash_before_rename_keeps_the_old_journal(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(journal(1))

    def crash(src: object, dst: object) -> None:
        raise KeyboardInterrupt("killed between fsync and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save(journal(5))
    monkeypatch.undo()
    loaded = store.load(KEY)
    assert loaded is not None and len(loaded.records) == 1  # the old one, whole
    assert len(os.listdir(store.tmp)) == 1  # the interrupted write's temp file
    store.save(journal(3))  # the next writer cleans it up
    assert os.listdir(store.tmp) == []
    assert len(store.load(KEY).records) == 3  # type: ignore[union-attr]


def test_leftover_temp_file_of_a_dead_writer_is_removed(store: Store) -> None:
    (store.tmp / f"{KEY}.json.999999.tmp").write_text('{"half": ')
    store.save(journal())
    assert os.listdir(store.tmp) == []


@pytest.mark.parametrize("content", [
    b"", b"{", b"[]", b'{"format": 1}', b"\xff\xfe", b'{"format": 2, "key": "x"}',
    json.dumps({**journal().to_json(), "records": [{"kind": 3}]}).encode(),
    json.dumps({**journal().to_json(), "key": "6b1a2c3d-4e5f-4a6b-8c7d-000000000000"}).encode(),
    json.dumps({**journal().to_json(), "variables": {"A": 1}}).encode(),
])
def test_corrupt_journals_are_reported_not_crashed_on(store: Store, content: bytes) -> None:
    store.path(KEY).write_bytes(content)
    with pytest.raises(CorruptJournal):
        store.load(KEY)
    assert list(store.journals()) == [(KEY, None)]
    dest = store.quarantine(KEY)
    assert dest.read_bytes() == content and store.journal_keys() == []


# -- journal-shaped JSON, valid or not ------------------------------------------------------

OTHER_KEY = "0c3b4ad5-1c9e-4b5e-9d1a-6f1f2f3e4d5c"
BAD_NAMES = ["", ".", "..", "../..", "../../etc/passwd", "a/b", "/", "tap 0", "tap\n0", "tap:0", "a" * 16,
             "é", "tap\udcff", "tap\x00", "-", "*"]
# Stands for an int of more digits than json.loads takes (4300), which json.dumps
# cannot write either: _encoded puts the digits in its place.
HUGE = "nichooks-test-huge-int"
# Any JSON, nested; ints far beyond 64 bits, one beyond what float() takes, and one
# beyond what json.loads takes; NaN and infinities (json writes them).
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(2**63, 2**70), st.just(10**400),
              st.just(HUGE), st.floats(), st.sampled_from(BAD_NAMES), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.text(max_size=5), st.sampled_from(BAD_NAMES)), inner,
                                            max_size=3)),
    max_leaves=8)
MISSING = object()  # a fault that leaves the field out
NOT_TEXT = [MISSING, None, 0, 7, True, False, 1.5, math.nan, math.inf, 10**400, HUGE, [], ["x"], {},
            {"x": "y"}]

names = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="/:"),
                min_size=1, max_size=15).filter(lambda n: n not in (".", ".."))
words = st.text(max_size=12)
VALID_RECORD = {"kind": st.sampled_from(["link.attr", "link.create", "route.proxy"]),
                "undo": st.dictionaries(words, st.one_of(st.integers(-1, 2**31), words, st.none()),
                                        max_size=3),
                "step": words, "status": st.sampled_from(["pending", "failed"]),
                "error": st.text(min_size=1, max_size=12)}
VALID_JOURNAL = {
    "format": st.just(1), "key": st.just(KEY), "tap": names,
    "mode": st.sampled_from(["bridged", "openvswitch", "routed"]), "instance": words,
    "link": st.one_of(st.none(), names), "ifindex": st.one_of(st.none(), st.integers(1, 2**31 - 1)),
    "context": st.sampled_from(["start", "hotplug", "migrate"]),
    "state": st.sampled_from(["applying", "applied", "undo-failed"]),
    "created": st.floats(0, 2e9),
    "variables": st.dictionaries(st.from_regex(r"[A-Z_]{1,8}", fullmatch=True), words, max_size=3),
    "records": st.lists(st.fixed_dictionaries(VALID_RECORD), max_size=3),
    "deferred": st.lists(st.fixed_dictionaries({"addr": words, "dev": names}), max_size=2),
    "down_scripts_ran": st.booleans(),
}
# Wrong values for each field, besides NOT_TEXT (which is wrong for most).
HOSTILE_RECORD: dict[str, list[Any]] = {
    "kind": [["link.attr"]], "undo": ["x", [["a", 1]]], "step": [], "status": [],
    "error": [{"x": 1}, ["e"]]}
HOSTILE_JOURNAL: dict[str, list[Any]] = {
    "format": [2, "1", 1.5],
    "key": ["", "../..", "../../etc/passwd", KEY.upper(), KEY + "/x", KEY[:-1], OTHER_KEY, KEY + "-emu",
            [KEY]],
    "tap": BAD_NAMES,
    "mode": BAD_NAMES,
    "instance": [],
    "link": BAD_NAMES,
    "ifindex": [-1, 2**31, 2**64, 1.0, "7"],
    "context": [],
    "state": [],
    "created": [-math.inf, "nan", "inf", "1e999", "1", [1.0]],
    "variables": [{"A": 1}, {"A": None}, {"A": ["x"]}, {"A": {"B": "c"}}, {"A": True}, ["A=1"], "A=1",
                  {"": ""}, {"A\x00": "x"}, {"A": "x\udcff"}],
    "records": ["x", [None], ["x"], [[]], [{"kind": "k"}], [{"undo": {}}]],
    "deferred": ["x", [None], [{}], [{"addr": 1, "dev": "x"}], [{"addr": "a", "dev": None}],
                 [{"addr": "a"}], [["a", "b"]], [{"addr": "a", "dev": "d", "more": "x"}]],
    "down_scripts_ran": ["yes", "true", 1, 0],
}
# Every single fault: one field of the journal or of one of its records.
FAULTS = [(where, name, value)
          for where, fields in (("journal", HOSTILE_JOURNAL), ("record", HOSTILE_RECORD))
          for name, values in fields.items() for value in [*values, *NOT_TEXT]]


def _set(data: dict[str, Any], name: str, value: Any) -> None:
    if value is MISSING:
        data.pop(name, None)
    else:
        data[name] = value


def with_fault(data: dict[str, Any], record: dict[str, Any], fault: tuple[str, str, Any],
               at: int = 0) -> dict[str, Any]:
    """``data`` with one field made wrong, or with ``record``, one field of it made
    wrong, inserted among its records at ``at``."""
    where, name, value = fault
    data = {**data, "records": list(data["records"])}
    if where == "journal":
        _set(data, name, value)
    else:
        record = dict(record)
        _set(record, name, value)
        data["records"].insert(at, record)
    return data


@st.composite
def one_fault(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = draw(st.fixed_dictionaries(VALID_JOURNAL))
    where, name = draw(st.sampled_from(sorted({(where, name) for where, name, _ in FAULTS})))
    value = draw(st.sampled_from([v for w, n, v in FAULTS if (w, n) == (where, name)]))
    return with_fault(data, draw(st.fixed_dictionaries(VALID_RECORD)), (where, name, value),
                      draw(st.integers(0, len(data["records"]))))


@st.composite
def many_faults(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """A valid journal with up to three fields left out or replaced by junk or by a
    wrong value, and maybe unknown fields; and whether anything was changed."""
    data = draw(st.fixed_dictionaries(VALID_JOURNAL))
    # (a shuffle: st.lists of sampled_from would lean on the first names)
    broken = draw(st.permutations(sorted(VALID_JOURNAL)))[:draw(st.integers(0, 3))]
    for name in broken:
        _set(data, name, draw(st.one_of(junk, st.sampled_from([*HOSTILE_JOURNAL[name], *NOT_TEXT]))))
    extra = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in VALID_JOURNAL), junk,
                                 max_size=2))
    return {**data, **extra}, bool(broken or extra)


# A journal as JSON data, and whether it was changed from a valid one; sometimes
# not even an object at the top.
journal_shaped = st.one_of(
    one_fault().map(lambda data: (data, True)),
    many_faults(),
    st.one_of(many_faults().map(lambda case: ([case[0]], True)),
              many_faults().map(lambda case: (json.dumps(case[0]), True)),
              st.sampled_from([(None, True), (1, True), ([], True)])),
)


def assert_well_typed(journal: Journal) -> None:
    """Every field of the loaded journal has the type Journal declares, and the
    names that become file names are safe to use as such."""
    assert journal.key == KEY and check_key(journal.key) == KEY
    assert isinstance(journal.tap, str) and ifname("tap", journal.tap) == journal.tap
    for text in (journal.mode, journal.instance, journal.context, journal.state):
        assert type(text) is str, text
    assert journal.link is None or type(journal.link) is str, journal.link
    assert journal.ifindex is None or type(journal.ifindex) is int, journal.ifindex  # bool is no index
    assert type(journal.created) is float, journal.created
    assert type(journal.variables) is dict
    assert all(type(k) is str and type(v) is str for k, v in journal.variables.items()), journal.variables
    assert type(journal.records) is list
    for record in journal.records:
        assert type(record) is Record
        assert (type(record.kind), type(record.undo), type(record.step), type(record.status)) == (
            str, dict, str, str), record
        assert record.error is None or type(record.error) is str, record
    assert type(journal.deferred) is list
    assert all(type(d) is dict and set(d) == {"addr", "dev"} and type(d["addr"]) is str
               and type(d["dev"]) is str for d in journal.deferred), journal.deferred
    assert type(journal.down_scripts_ran) is bool, journal.down_scripts_ran


def load_or_corrupt(store: Store, content: bytes) -> Journal | None:
    """Store.load of ``content``: a well-typed journal, or None for CorruptJournal;
    any other exception fails the test."""
    store.path(KEY).write_bytes(content)
    try:
        journal = store.load(KEY)
    except CorruptJournal:
        return None
    assert journal is not None
    assert_well_typed(journal)
    return journal


def _encoded(data: Any) -> bytes:
    return json.dumps(data).replace(f'"{HUGE}"', "9" * 5000).encode("utf-8", "surrogatepass")


def _fault_id(fault: tuple[str, str, Any]) -> str:
    where, name, value = fault
    return f"{where}.{name}-missing" if value is MISSING else f"{where}.{name}={value!r:.24}"


@pytest.mark.parametrize("fault", FAULTS, ids=[_fault_id(f) for f in FAULTS])
def test_journal_with_one_wrong_field_loads_well_typed_or_raises_corrupt(
        store: Store, fault: tuple[str, str, Any]) -> None:
    """Every wrong value of the catalogue above, alone in an otherwise valid journal
    (a field of the journal, or of a record added to it)."""
    record = {"kind": "link.attr", "undo": {"ifindex": 7}, "step": "set mtu", "status": "failed",
              "error": "EBUSY"}
    load_or_corrupt(store, _encoded(with_fault(journal().to_json(), record, fault)))


# Random bytes, and journal-shaped JSON cut short or with one byte replaced.
@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda data, cut: data[:cut], journal_shaped.map(lambda case: _encoded(case[0])),
              st.integers(0, 2000)),
    st.builds(lambda data, at, byte: data[:at] + bytes([byte]) + data[at + 1:],
              journal_shaped.map(lambda case: _encoded(case[0])), st.integers(0, 2000), st.integers(0, 255))))
def test_any_bytes_load_or_raise_corrupt(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    s = Store(tmp_path_factory.mktemp("j"))
    s.ensure()
    load_or_corrupt(s, data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(journal_shaped)
def test_journal_shaped_json_loads_well_typed_or_raises_corrupt(
        tmp_path_factory: pytest.TempPathFactory, case: tuple[Any, bool]) -> None:
    """Wrong types, missing keys and hostile values in a journal: Store.load gives a
    journal whose every field has its declared type, or CorruptJournal - never
    another exception. One left as written must load, and unchanged."""
    data, changed = case
    s = Store(tmp_path_factory.mktemp("j"))
    s.ensure()
    journal = load_or_corrupt(s, _encoded(data))
    if not changed:
        assert journal is not None, "a valid journal was called corrupt"
        assert journal.to_json() == data


def test_only_journals_count_as_keys(store: Store) -> None:
    (store.nics / "README").write_text("x")
    (store.nics / "../nics/..json").write_text("x")
    store.save(journal())
    assert store.journal_keys() == [KEY]


@pytest.mark.parametrize("key", ["../../etc/passwd", "", KEY.upper(), KEY + "/x", KEY[:-1]])
def test_keys_cannot_escape(key: str) -> None:
    with pytest.raises(InvalidInput):
        check_key(key)


def test_tap_index_release_only_by_owner(store: Store) -> None:
    other = "0c3b4ad5-1c9e-4b5e-9d1a-6f1f2f3e4d5c"
    store.claim_tap("tap0", KEY)
    assert store.tap_owner("tap0") == KEY
    store.claim_tap("tap0", other)  # a newer plug took the name
    store.release_tap("tap0", KEY)
    assert store.tap_owner("tap0") == other
    store.release_tap("tap0", other)
    assert store.tap_owner("tap0") is None


def test_files_have_explicit_modes_under_a_strict_umask(store: Store) -> None:
    old = os.umask(0o077)  # Ganeti runs hooks with umask 0077
    try:
        store.save(journal())
    finally:
        os.umask(old)
    assert store.path(KEY).stat().st_mode & 0o777 == 0o644


def test_a_write_removes_only_its_own_stale_temp_files(store: Store) -> None:
    """The name is matched literally: `tap0` must not take `tap0.100`'s temp file,
    and a tap named `*` must not take every temp file."""
    others = ["tap0.100.4242.tmp", f"{KEY}.json.17.tmp", "tap1.99.tmp", "tap0.tmp",
              "tap0.x.tmp", "tap0.99.tmp.keep"]
    for name in [*others, "tap0.99.tmp", "*.5.tmp"]:
        (store.tmp / name).write_bytes(b"in progress")
    store.claim_tap("tap0", KEY)
    store.claim_tap("*", KEY)
    assert sorted(os.listdir(store.tmp)) == sorted(others)
    assert store.tap_owner("tap0") == store.tap_owner("*") == KEY


def test_a_write_that_fails_keeps_the_old_file_and_no_temp_file(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short write (what a full tmpfs does) never replaces a good journal."""
    store.save(journal(1))
    good = store.path(KEY).read_bytes()
    real_write = os.write
    calls = []

    def short_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(PlumbingError, match="No space left on device"):
        store.save(journal(3))
    monkeypatch.undo()
    assert calls[1] == calls[0] - 10  # the rest was tried, not dropped
    assert store.path(KEY).read_bytes() == good
    assert os.listdir(store.tmp) == []
