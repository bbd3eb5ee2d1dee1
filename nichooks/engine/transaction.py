"""The journal lifecycle, written once: write-ahead apply, read-back, commit or roll
back, and what is left of a journal after an undo.

Every change nichooks makes goes through `write_ahead`: the step's undo record is
on disk before the step runs, so a crash at any point leaves a journal naming
everything that might exist (docs/architecture.md, "The journal contract").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

from nichooks.engine import records as kinds
from nichooks.engine.journal import CorruptJournal, Journal, Record, State, Status
from nichooks.engine.store import JournalWriteError, Store
from nichooks.errors import PlumbingError, cause

if TYPE_CHECKING:
    from nichooks.engine.records import Step
    from nichooks.log import HookLog


# -- reading a journal: one policy for one that cannot be read ---------------------------
@dataclass
class Unreadable:
    """A journal file that is not one we wrote. Nothing is undone from it (a journal we
    cannot read is not proof of what exists); whoever acts on the NIC under its lock
    (ifup, ifdown, the sweep) moves it aside to corrupt/, kept for an operator and no
    longer blocking the NIC; a reader (verify, announce, a repair) leaves it there."""

    key: str
    cause: str
    moved_to: str | None  # None: left in place (a dry run, a read-only command)

    def line(self) -> str:
        where = f"moved to {self.moved_to}" if self.moved_to else "would move it aside"
        return f"unreadable journal ({self.cause}); {where}"


def load(store: Store, key: str, log: HookLog, *, move_aside: bool = True,
         event: str = "journal") -> Journal | Unreadable | None:
    """The NIC's journal, None if there is none, Unreadable if it is corrupt. The caller
    holds the NIC's locks. `move_aside`: whether this caller acts on the NIC (ifup,
    ifdown, a sweep) rather than only reading it (verify, announce, the agent's
    repair, which leave it to the next sweep)."""
    try:
        return store.load(key)
    except CorruptJournal as exc:
        if not move_aside:
            return Unreadable(key, str(exc), None)
        moved = str(store.quarantine(key))
        log.error(event, journal=key, result="corrupt", cause=str(exc), moved_to=moved)
        return Unreadable(key, str(exc), moved)


# -- undo ---------------------------------------------------------------------------------
def undo_records(net: Any, records: list[Record], log: HookLog) -> list[Record]:
    """Undo records in reverse, each independently (best effort); return the ones that
    failed, in journal order, marked failed with the cause."""
    failed: list[Record] = []
    for record in reversed(records):
        try:
            kinds.undo(net, record)
        except Exception as exc:  # best effort: one failure must not stop the rest
            record.status, record.error = Status.FAILED, cause(exc)
            failed.append(record)
            log.error("undo", step=record.step, result="failed", cause=record.error)
        else:
            log.info("undo", step=record.step, result="ok")
    failed.reverse()
    return failed


def keep_only(store: Store, journal: Journal, remaining: list[Record], log: HookLog, *,
              must_save: bool = False) -> None:
    """After an undo: keep the journal for the records still to retry (`undo-failed`),
    or forget the NIC when none is left. A journal that cannot be saved is logged: the
    complete one on disk names every record still listed (and some already undone,
    whose undo is idempotent), so nothing is lost, only retried. `must_save`: raise
    instead (an ifup converging must not go on over a journal it could not write)."""
    journal.records = remaining
    if not remaining:
        store.forget(journal.key, journal.tap)
        return
    journal.state = State.UNDO_FAILED
    try:
        store.save(journal)
    except JournalWriteError as exc:
        if must_save:
            raise
        log.error("journal", result="not saved", cause=exc.cause)


def failed_text(failed: list[Record]) -> str:
    return "; ".join(f"{r.step} ({r.error})" for r in failed)


# -- write-ahead --------------------------------------------------------------------------
def write_ahead(store: Store, net: Any, journal: Journal, step: Step,
                at: int | None = None) -> dict[str, Any]:
    """Put the step's undo record on disk, then apply the step. `at`: the record it
    replaces (repair), whose `old` value is kept: the value before nichooks first
    changed it is the one to restore."""
    record = step.prepare(net)
    if at is None:
        journal.records.append(record)
    else:
        old = journal.records[at]
        if "old" in old.undo and "old" in record.undo:
            record = replace(record, undo={**record.undo, "old": old.undo["old"]})
        journal.records[at] = record
    store.save(journal)
    return step.apply(net) or {}


def read_back(step: Step, net: Any, *, just_applied: bool = False) -> str | None:
    """What differs between the step and the host (None: nothing). Not being able to
    read it back is as bad as a mismatch. `just_applied`: this process has just applied
    the step, and a step whose apply is one atomic transaction may read back only part
    of it then (its `verify_applied`, if it has one)."""
    check = getattr(step, "verify_applied", None) if just_applied else None
    try:
        return (check or step.verify)(net)
    except Exception as exc:
        return f"cannot read back: {cause(exc)}"


# -- one plug -------------------------------------------------------------------------------
@dataclass
class Transaction:
    """One ifup's apply -> verify -> commit, or its rollback. Records before
    `first_new` were carried from an earlier plug whose undo failed: a rollback keeps
    them for a later ifdown."""

    store: Store
    net: Any
    journal: Journal
    log: HookLog
    label: str
    first_new: int

    def apply(self, steps: list[Step]) -> None:
        for step in steps:
            try:
                facts = write_ahead(self.store, self.net, self.journal, step)
            except BaseException as exc:
                self.log.error("step", step=step.describe(), result="failed", cause=cause(exc))
                if not isinstance(exc, Exception):
                    self.undo_new()
                    raise
                self.rollback(cause(exc), step.describe())
            self.log.info("step", step=step.describe(), result="ok", **facts)

    def verify(self, steps: list[Step]) -> None:
        """Read back what was applied (nmstate's apply-verify-commit)."""
        for step in steps:
            mismatch = read_back(step, self.net, just_applied=True)
            if mismatch:
                self.log.error("verify", step=step.describe(), result="mismatch", cause=mismatch)
                self.rollback(f"read back: {mismatch}", f"verify {step.describe()}")

    def commit(self, scripts: Callable[[], list[str]]) -> None:
        """Run the ifup scripts between preparing the `applied` journal and renaming it
        into place. Written before the scripts, the journal cannot be lost to a disk they
        fill; if it cannot be written at all, or the rename fails, the plug is rolled
        back: a journal left `applying` would make the next sweep undo a working NIC.
        `scripts` returns the reasons of the scripts that failed."""
        self.journal.state = State.APPLIED
        try:
            final = self.store.prepare_save(self.journal)
        except JournalWriteError as exc:
            self.journal.state = State.APPLYING
            self.rollback(exc.cause, "journal")
        try:
            failures = scripts()
        except BaseException as exc:  # the scripts could not even be run: as a failed one
            final.discard()
            self.journal.state = State.APPLYING
            if not isinstance(exc, Exception):
                self.undo_new()
                raise
            self.rollback(f"custom scripts: {cause(exc)}", "custom script")
        if failures:
            final.discard()
            self.journal.state = State.APPLYING
            self.rollback(f"custom script failed: {failures[0]}", "custom script")
        try:
            final.commit()
        except JournalWriteError as exc:
            self.journal.state = State.APPLYING
            self.rollback(f"{exc.cause} (the ifup scripts had run)", "journal")

    def undo_new(self) -> list[Record]:
        """Undo what this plug applied; keep what could not be undone."""
        journal, first = self.journal, self.first_new
        failed = undo_records(self.net, journal.records[first:], self.log)
        keep_only(self.store, journal, journal.records[:first] + failed, self.log)
        return failed

    def rollback(self, why: str, step: str) -> NoReturn:
        """Undo what this plug applied and fail with one line."""
        failed = self.undo_new()
        if failed:
            why += "; rollback incomplete, kept in the journal: " + failed_text(failed)
        raise PlumbingError(why, nic=self.label, step=step)
