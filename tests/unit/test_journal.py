"""The journal survives crashes: a reader sees the old or the new file, never half."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nichooks.errors import InvalidInput, PlumbingError
from nichooks.journal import CorruptJournal, Journal, Record, Store, check_key

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


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_load_or_raise_corrupt(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    s = Store(tmp_path_factory.mktemp("j"))
    s.ensure()
    s.path(KEY).write_bytes(data)
    try:
        s.load(KEY)
    except CorruptJournal:
        pass


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
