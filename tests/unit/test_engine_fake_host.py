"""The engine and the ops (converge, rollback, settle, repair) against a fake host.

No root, no netlink, no OVS: a `FakeHost` holds a dict of facts and the links the ops
look up (find / by_index), and a test-only record kind, `test.fact`, sets and removes
facts. The state directory is a real Store on tmp_path, so every assertion is on the
journal files and the tap index as they are on disk.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from nichooks import settings as settingsmod
from nichooks.engine import records as kinds
from nichooks.engine import transaction as txn
from nichooks.engine.journal import Journal, Record, State, Status
from nichooks.engine.records import Step
from nichooks.engine.store import Store
from nichooks.errors import PlumbingError
from nichooks.host.host import Host
from nichooks.host.netlink import LinkState
from nichooks.log import HookLog
from nichooks.model.nic import Nic
from nichooks.modes.registry import nic_from_variables
from nichooks.ops.plug import converge
from nichooks.ops.settle import Teardown, settle
from nichooks.ops.verify import drift, repair

KIND = "test.fact"
KEY = "6b1a2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
OTHER = "0f0e0d0c-0b0a-4909-8807-060504030201"
TAP = "tap0"
IFINDEX = 7
# ext mode plans nothing on the host: no settings file is read for these tests
SETTINGS = settingsmod.load({"NICHOOKS_CONF_DIR": "/nonexistent/nichooks-test-conf"})
VARIABLES = {"MODE": "ext", "MAC": "aa:00:00:00:00:01", "INTERFACE": TAP, "INTERFACE_UUID": KEY}


# -- the fake host -------------------------------------------------------------------------
@dataclass
class FakeHost:
    """What the engine and the ops call on a host, and the facts the fake steps change."""

    facts: dict[str, str] = field(default_factory=dict)
    links: dict[int, LinkState] = field(default_factory=dict)
    fail_apply: set[str] = field(default_factory=set)
    fail_undo: set[str] = field(default_factory=set)
    mismatch: set[str] = field(default_factory=set)  # verify reports these wrong
    undo_calls: list[str] = field(default_factory=list)
    # Write-ahead probe: with a store, apply reads the journal `watch` from disk.
    store: Store | None = None
    watch: str = KEY
    on_disk_at_apply: dict[str, bool] = field(default_factory=dict)
    closed: bool = False

    @property
    def netlink(self) -> FakeHost:
        """The host's rtnetlink driver: the fake answers its link lookups itself."""
        return self

    def add_link(self, index: int, name: str) -> None:
        self.links[index] = LinkState(index=index, name=name, kind="tun", slave_kind=None,
                                      mac="fe:00:00:00:00:01", mtu=1500, up=True, master=None)

    def find(self, name: str) -> LinkState | None:
        return next((s for s in self.links.values() if s.name == name), None)

    def by_index(self, index: int) -> LinkState | None:
        return self.links.get(index)

    def close(self) -> None:
        self.closed = True


def host(fake: FakeHost) -> Host:
    """The fake where the ops' signatures want a Host."""
    return cast(Host, fake)


# -- the test-only record kind -------------------------------------------------------------
@dataclass(frozen=True)
class FactStep:
    """Sets facts[key] = value; its record remembers the value before (`old`)."""

    key: str
    value: str

    @property
    def kind(self) -> str:
        return KIND

    def describe(self) -> str:
        return f"set fact {self.key}={self.value}"

    def as_data(self) -> dict[str, Any]:
        return {"kind": KIND, "key": self.key, "value": self.value}

    def prepare(self, net: Any) -> Record:
        fake = cast(FakeHost, net)
        return Record(kind=KIND, undo={"key": self.key, "value": self.value,
                                       "old": fake.facts.get(self.key)},
                      step=self.describe())

    def apply(self, net: Any) -> dict[str, Any] | None:
        fake = cast(FakeHost, net)
        if fake.store is not None:
            journal = fake.store.load(fake.watch)
            fake.on_disk_at_apply[self.key] = journal is not None and any(
                r.kind == KIND and r.undo.get("key") == self.key and r.undo.get("value") == self.value
                for r in journal.records)
        if self.key in fake.fail_apply:
            raise OSError(errno.EBUSY, f"cannot set fact {self.key}")
        fake.facts[self.key] = self.value
        return {"fact": self.key}

    def verify(self, net: Any) -> str | None:
        fake = cast(FakeHost, net)
        have = fake.facts.get(self.key)
        if self.key in fake.mismatch or have != self.value:
            return f"fact {self.key} is {have!r}, want {self.value!r}"
        return None


def undo_fact(net: Any, undo: dict[str, Any]) -> None:
    fake = cast(FakeHost, net)
    key = undo["key"]
    fake.undo_calls.append(key)
    if key in fake.fail_undo:
        raise OSError(errno.EBUSY, f"fact {key} is busy")
    if undo.get("old") is None:
        fake.facts.pop(key, None)
    else:
        fake.facts[key] = undo["old"]


def fact_present(net: Any, undo: dict[str, Any]) -> bool:
    return bool(cast(FakeHost, net).facts.get(undo["key"]) == undo["value"])


def rebuild_fact(undo: dict[str, Any], nic: Any, net: Any) -> FactStep | None:
    assert isinstance(nic, Nic) and nic.tap == TAP  # repair hands over the journal's NIC
    return FactStep(undo["key"], undo["value"])


@pytest.fixture(scope="module", autouse=True)
def fact_kind() -> Iterator[None]:
    assert KIND not in kinds.KINDS, f"{KIND} is a real record kind"
    kinds.undoes(KIND)(undo_fact)
    kinds.checks(KIND)(fact_present)
    kinds.rebuilds(KIND)(rebuild_fact)
    try:
        yield
    finally:
        kinds.KINDS.pop(KIND, None)


# -- helpers -------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state")
    s.ensure()
    return s


@pytest.fixture
def log() -> HookLog:
    return HookLog(verbose=False)


@pytest.fixture
def fake() -> FakeHost:
    f = FakeHost()
    f.add_link(IFINDEX, TAP)
    return f


def new_journal(key: str = KEY, tap: str = TAP, *, state: str = State.APPLYING,
                records: list[Record] | None = None) -> Journal:
    return Journal(key=key, tap=tap, mode="ext", instance="vm1", link=None, ifindex=IFINDEX,
                   context="start", state=state, variables=dict(VARIABLES),
                   records=list(records or []))


def begin(store: Store, fake: FakeHost, log: HookLog, carried: list[Record] | None = None) -> txn.Transaction:
    """What ifup does before applying: save the journal, claim the tap."""
    journal = new_journal(records=carried)
    store.save(journal)
    store.claim_tap(TAP, KEY)
    return txn.Transaction(store, host(fake), journal, log, "vm1 tap0", len(carried or []))


def plugged(store: Store, fake: FakeHost, steps: Sequence[Step],
            key: str = KEY, tap: str = TAP, state: str = State.APPLIED) -> Journal:
    """A journal on disk whose steps were applied to the fake host through write_ahead."""
    journal = new_journal(key, tap, state=State.APPLYING)
    store.save(journal)
    store.claim_tap(tap, key)
    for step in steps:
        txn.write_ahead(store, host(fake), journal, step)
    journal.state = state
    store.save(journal)
    return journal


def on_disk(store: Store, key: str = KEY) -> Journal:
    journal = store.load(key)
    assert journal is not None, f"no journal {key} on disk"
    return journal


def steps_abc() -> list[Step]:
    return [FactStep("a", "1"), FactStep("b", "2"), FactStep("c", "3")]


# -- 1. apply and rollback -----------------------------------------------------------------
def test_apply_failure_rolls_back_and_forgets(store: Store, fake: FakeHost, log: HookLog) -> None:
    fake.fail_apply = {"b"}
    plug = begin(store, fake, log)
    steps = steps_abc()
    with pytest.raises(PlumbingError) as err:
        plug.apply(steps)
    assert err.value.step == steps[1].describe()
    assert "cannot set fact b" in str(err.value)
    assert fake.facts == {}  # a undone, b never set, c never reached
    assert fake.undo_calls == ["b", "a"]  # reverse order, the failed step's record included
    assert not store.exists(KEY)
    assert store.tap_owner(TAP) is None


def test_rollback_keeps_the_record_whose_undo_fails(store: Store, fake: FakeHost, log: HookLog) -> None:
    fake.fail_apply, fake.fail_undo = {"b"}, {"a"}
    plug = begin(store, fake, log)
    with pytest.raises(PlumbingError) as err:
        plug.apply(steps_abc())
    assert "rollback incomplete" in err.value.cause and "fact a is busy" in err.value.cause
    assert fake.facts == {"a": "1"}
    journal = on_disk(store)
    assert journal.state == State.UNDO_FAILED
    assert [(r.kind, r.undo["key"]) for r in journal.records] == [(KIND, "a")]
    assert journal.records[0].status == Status.FAILED
    assert journal.records[0].error == "fact a is busy"
    assert store.tap_owner(TAP) == KEY  # still claimed: the record names it


# -- 2. write-ahead ------------------------------------------------------------------------
def test_record_is_on_disk_before_the_step_runs(store: Store, fake: FakeHost, log: HookLog) -> None:
    fake.store, fake.fail_apply = store, {"c"}
    plug = begin(store, fake, log)
    with pytest.raises(PlumbingError):
        plug.apply(steps_abc())
    assert fake.on_disk_at_apply == {"a": True, "b": True, "c": True}


# -- 3. verify -----------------------------------------------------------------------------
def test_read_back_mismatch_rolls_back(store: Store, fake: FakeHost, log: HookLog) -> None:
    plug = begin(store, fake, log)
    steps = steps_abc()
    plug.apply(steps)
    assert fake.facts == {"a": "1", "b": "2", "c": "3"}
    assert len(on_disk(store).records) == 3
    fake.mismatch = {"b"}
    with pytest.raises(PlumbingError) as err:
        plug.verify(steps)
    assert err.value.cause.startswith("read back: fact b")
    assert err.value.step == f"verify {steps[1].describe()}"
    assert fake.facts == {}
    assert not store.exists(KEY) and store.tap_owner(TAP) is None


def test_verify_passes_when_everything_reads_back(store: Store, fake: FakeHost, log: HookLog) -> None:
    plug = begin(store, fake, log)
    plug.apply(steps_abc())
    plug.verify(steps_abc())
    assert on_disk(store).state == State.APPLYING  # verify alone commits nothing
    assert fake.facts == {"a": "1", "b": "2", "c": "3"}


# -- 4. commit -----------------------------------------------------------------------------
def test_commit_with_a_failed_script_rolls_back(store: Store, fake: FakeHost, log: HookLog) -> None:
    plug = begin(store, fake, log)
    plug.apply(steps_abc())
    with pytest.raises(PlumbingError) as err:
        plug.commit(lambda: ["99-fail exited 3"])
    assert err.value.cause == "custom script failed: 99-fail exited 3"
    assert fake.facts == {}
    assert not store.exists(KEY) and store.tap_owner(TAP) is None
    assert store.journal_keys() == [] and list(store.tmp.iterdir()) == []  # prepared save discarded


def test_commit_rollback_keeps_carried_records_not_applied(store: Store, fake: FakeHost,
                                                          log: HookLog) -> None:
    carried = Record(kind=KIND, undo={"key": "old", "value": "x", "old": None}, step="carried",
                     status=Status.FAILED, error="busy before")
    plug = begin(store, fake, log, carried=[carried])
    plug.apply(steps_abc())
    with pytest.raises(PlumbingError):
        plug.commit(lambda: ["boom"])
    journal = on_disk(store)
    assert journal.state == State.UNDO_FAILED
    assert [r.step for r in journal.records] == ["carried"]
    assert "old" not in fake.undo_calls  # a rollback undoes only this plug's records
    assert fake.facts == {}


def test_commit_ok_writes_applied(store: Store, fake: FakeHost, log: HookLog) -> None:
    plug = begin(store, fake, log)
    plug.apply(steps_abc())
    plug.verify(steps_abc())
    ran: list[str] = []

    def scripts() -> list[str]:
        # The applied journal is prepared, not yet in place, while the scripts run.
        ran.append(on_disk(store).state)
        return []

    plug.commit(scripts)
    assert ran == [State.APPLYING]
    journal = on_disk(store)
    assert journal.state == State.APPLIED
    assert [r.undo["key"] for r in journal.records] == ["a", "b", "c"]
    assert all(r.status == Status.PENDING for r in journal.records)
    assert store.tap_owner(TAP) == KEY
    assert fake.facts == {"a": "1", "b": "2", "c": "3"}


# -- 5. converge ---------------------------------------------------------------------------
def nic() -> Nic:
    return nic_from_variables(VARIABLES)


def test_converge_undoes_the_earlier_plug(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, steps_abc())
    assert fake.facts == {"a": "1", "b": "2", "c": "3"}
    assert converge(store, host(fake), nic(), log) == (True, [])
    assert fake.facts == {}
    assert not store.exists(KEY)
    assert store.tap_owner(TAP) is None


def test_converge_carries_a_record_whose_undo_fails(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, steps_abc())
    fake.fail_undo = {"b"}
    undone, carried = converge(store, host(fake), nic(), log)
    assert undone is True
    assert [(r.undo["key"], r.status) for r in carried] == [("b", Status.FAILED)]
    assert carried[0].error == "fact b is busy"
    assert fake.facts == {"b": "2"}
    assert not store.exists(KEY)  # the new journal, written next by ifup, carries it


def test_converge_with_nothing_to_undo(store: Store, fake: FakeHost, log: HookLog) -> None:
    assert converge(store, host(fake), nic(), log) == (False, [])
    assert store.journal_keys() == []


def test_converge_undoes_another_nic_on_the_same_tap(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, [FactStep("x", "9")], key=OTHER)
    assert store.tap_owner(TAP) == OTHER
    assert converge(store, host(fake), nic(), log) == (True, [])
    assert fake.facts == {}
    assert not store.exists(OTHER)
    assert store.tap_owner(TAP) is None


def test_converge_keeps_another_nics_failed_records(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, [FactStep("x", "9"), FactStep("y", "8")], key=OTHER)
    fake.fail_undo = {"x"}
    undone, carried = converge(store, host(fake), nic(), log)
    assert (undone, carried) == (True, [])  # not ours to carry
    other = on_disk(store, OTHER)
    assert other.state == State.UNDO_FAILED
    assert [r.undo["key"] for r in other.records] == ["x"]
    assert store.tap_owner(TAP) is None  # released for the new plug
    assert fake.facts == {"x": "9"}


def test_converge_moves_a_corrupt_journal_aside(store: Store, fake: FakeHost, log: HookLog) -> None:
    store.claim_tap(TAP, KEY)
    store.path(KEY).write_text("{not json")
    assert converge(store, host(fake), nic(), log) == (False, [])
    assert store.quarantined_keys() == {KEY}
    assert not store.exists(KEY)
    assert store.tap_owner(TAP) is None


# -- 6. settle -----------------------------------------------------------------------------
def test_settle_rolls_back_an_interrupted_ifup(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, steps_abc(), state=State.APPLYING)
    actions, teardown = settle(store, host(fake), KEY, log)
    assert [a.what for a in actions] == ["rolled-back"]
    assert actions[0].ok
    assert teardown is None  # its ifup scripts never all ran: no ifdown scripts either
    assert fake.facts == {}
    assert not store.exists(KEY) and store.tap_owner(TAP) is None


def test_settle_undoes_a_vanished_device(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, steps_abc())
    del fake.links[IFINDEX]
    fake.add_link(IFINDEX + 1, TAP)  # the same name on a new device is not this plug's
    actions, teardown = settle(store, host(fake), KEY, log)
    assert [a.what for a in actions] == ["undone"]
    assert teardown == Teardown(TAP, VARIABLES)
    assert fake.facts == {}
    assert not store.exists(KEY)


def test_settle_vanished_with_a_failing_undo_runs_teardown_once(store: Store, fake: FakeHost,
                                                               log: HookLog) -> None:
    plugged(store, fake, steps_abc())
    fake.links.clear()
    fake.fail_undo = {"a"}
    actions, teardown = settle(store, host(fake), KEY, log)
    assert [(a.what, a.ok) for a in actions] == [("failed", False)]
    assert teardown is not None
    journal = on_disk(store)
    assert journal.down_scripts_ran and journal.state == State.UNDO_FAILED
    fake.fail_undo = set()
    actions, teardown = settle(store, host(fake), KEY, log)
    assert [a.what for a in actions] == ["undone"] and teardown is None
    assert fake.facts == {} and not store.exists(KEY)


def test_settle_retries_a_record_that_failed_before(store: Store, fake: FakeHost, log: HookLog) -> None:
    fake.facts = {"a": "1"}
    failed = Record(kind=KIND, undo={"key": "a", "value": "1", "old": None}, step="set fact a=1",
                    status=Status.FAILED, error="fact a is busy")
    store.save(new_journal(state=State.UNDO_FAILED, records=[failed]))
    store.claim_tap(TAP, KEY)
    actions, teardown = settle(store, host(fake), KEY, log)
    assert [a.what for a in actions] == ["retried"] and teardown is None
    assert fake.facts == {}
    assert not store.exists(KEY) and store.tap_owner(TAP) is None


def test_settle_dry_run_changes_nothing(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, steps_abc(), state=State.APPLYING)
    before = store.path(KEY).read_bytes()
    actions, teardown = settle(store, host(fake), KEY, log, dry_run=True)
    assert [a.what for a in actions] == ["rolled-back"] and "would undo 3" in actions[0].detail
    assert teardown is None
    assert fake.facts == {"a": "1", "b": "2", "c": "3"} and fake.undo_calls == []
    assert store.path(KEY).read_bytes() == before
    assert store.tap_owner(TAP) == KEY


def test_settle_leaves_another_ifindex_alone(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, steps_abc(), state=State.APPLYING)
    before = store.path(KEY).read_bytes()
    assert settle(store, host(fake), KEY, log, only_index=IFINDEX + 1) == ([], None)
    assert fake.facts == {"a": "1", "b": "2", "c": "3"}
    assert store.path(KEY).read_bytes() == before


# -- 7. repair -----------------------------------------------------------------------------
def test_repair_reapplies_the_step_rebuilt_from_its_record(store: Store, fake: FakeHost,
                                                          log: HookLog) -> None:
    fake.facts = {"mtu": "1500"}  # what the first plug found and changed
    plugged(store, fake, [FactStep("a", "1"), FactStep("mtu", "9000")])
    assert on_disk(store).records[1].undo["old"] == "1500"
    del fake.facts["mtu"]  # someone removed it behind our back
    assert drift(host(fake), SETTINGS, on_disk(store)) == ["missing: set fact mtu=9000"]
    fake.store = store
    actions = repair(store, host(fake), SETTINGS, KEY, log)
    assert [a.what for a in actions] == ["repaired"]
    assert "set fact mtu=9000" in actions[0].detail
    assert fake.facts == {"a": "1", "mtu": "9000"}
    assert fake.on_disk_at_apply == {"mtu": True}  # repair writes ahead too
    journal = on_disk(store)
    assert journal.state == State.APPLIED
    assert [r.undo for r in journal.records] == [
        {"key": "a", "value": "1", "old": None},
        {"key": "mtu", "value": "9000", "old": "1500"},  # the first plug's, not None
    ]
    # An ifdown after the repair restores what was there before nichooks.
    fake.links.clear()
    assert [a.what for a in settle(store, host(fake), KEY, log)[0]] == ["undone"]
    assert fake.facts == {"mtu": "1500"}


def test_repair_quick_with_everything_present_does_nothing(store: Store, fake: FakeHost,
                                                          log: HookLog) -> None:
    plugged(store, fake, steps_abc())
    before = store.path(KEY).read_bytes()
    fake.store = store
    assert repair(store, host(fake), SETTINGS, KEY, log, quick=True) == []
    assert repair(store, host(fake), SETTINGS, KEY, log) == []
    assert fake.on_disk_at_apply == {}  # nothing re-applied
    assert store.path(KEY).read_bytes() == before


def test_repair_quick_still_repairs_what_is_missing(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, steps_abc())
    del fake.facts["c"]
    actions = repair(store, host(fake), SETTINGS, KEY, log, quick=True)
    assert [a.what for a in actions] == ["repaired"]
    assert fake.facts == {"a": "1", "b": "2", "c": "3"}


def test_repair_leaves_an_unfinished_plug_alone(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, steps_abc(), state=State.APPLYING)
    del fake.facts["a"]
    assert repair(store, host(fake), SETTINGS, KEY, log) == []
    assert "a" not in fake.facts


def test_repair_stops_at_a_step_that_does_not_take(store: Store, fake: FakeHost, log: HookLog) -> None:
    plugged(store, fake, steps_abc())
    fake.facts.clear()
    fake.fail_apply = {"a"}
    actions = repair(store, host(fake), SETTINGS, KEY, log)
    assert [(a.what, a.ok) for a in actions] == [("failed", False)]
    assert fake.facts == {}  # b and c depend on a: not tried


def test_fact_kind_is_registered_only_here() -> None:
    entry = kinds.KINDS[KIND]
    assert entry.undo is undo_fact and entry.present is fact_present and entry.rebuild is rebuild_fact
    assert not kinds.by_tap_name(Record(kind=KIND, undo={}, step=""))


class _Partial:
    """A step whose full read-back differs but whose read-back right after its own
    apply (one atomic transaction) passes."""

    kind = "fake.partial"

    def verify(self, net: Any) -> str | None:
        return "the shared part differs"

    def verify_applied(self, net: Any) -> str | None:
        return None


class _Whole:
    kind = "fake.whole"

    def verify(self, net: Any) -> str | None:
        return "differs"


def test_read_back_right_after_apply_may_check_less_and_repairs_check_all() -> None:
    partial = cast(Step, _Partial())
    assert txn.read_back(partial, None) == "the shared part differs"  # repair, status
    assert txn.read_back(partial, None, just_applied=True) is None    # a plug's verify
    assert txn.read_back(cast(Step, _Whole()), None, just_applied=True) == "differs"
