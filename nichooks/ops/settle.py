"""Late work on one journal, after the hook that wrote it has gone: roll back an ifup
that died, undo a NIC whose device vanished without an ifdown, retry undo records that
failed before. Used by the sweep and the agent.

Released Ganeti never calls an ifdown, so this is how most NICs end. The caller holds
the NIC's locks; whether the plug it would touch is still the one the journal
describes is decided from the journal's ifindex: a soft reboot reuses the tap *name*
within milliseconds, never the ifindex.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nichooks.engine import records as kinds
from nichooks.engine import transaction as txn
from nichooks.engine.actions import Action
from nichooks.engine.custom import run_custom
from nichooks.engine.journal import Journal, State, Status
from nichooks.engine.store import Store
from nichooks.host.host import Host
from nichooks.log import HookLog
from nichooks.modes import registry  # noqa: F401  installs the loader of every record kind
from nichooks.settings import Settings

PRESENT_DEVICE, GONE, RENAMED = "present", "gone", "renamed"


@dataclass
class Teardown:
    """A NIC undone late: its ifdown scripts still run, after the locks are released."""

    tap: str
    variables: dict[str, str] = field(default_factory=dict)


def label(journal: Journal) -> str:
    return f"{journal.instance or '-'} {journal.tap} ({journal.key})"


def device_state(net: Host, journal: Journal) -> str:
    """Whether the device this plug was made on still exists. By ifindex: the same name
    on another index is a newer device, and this plug's device is gone."""
    if journal.ifindex is None:
        return PRESENT_DEVICE if net.netlink.find(journal.tap) is not None else GONE
    state = net.netlink.by_index(journal.ifindex)
    if state is None:
        return GONE
    return PRESENT_DEVICE if state.name == journal.tap else RENAMED


def _drop_claimed_by_others(store: Store, journal: Journal, log: HookLog) -> None:
    """A stale journal's records that find their object by tap name are dropped when
    another NIC has claimed that tap name since: its object looks the same as ours."""
    owner = store.tap_owner(journal.tap)
    if owner is None or owner == journal.key:
        return
    kept = [r for r in journal.records if not kinds.by_tap_name(r)]
    if len(kept) != len(journal.records):
        log.info("sweep", result="skipped", cause=f"{journal.tap} now belongs to {owner}",
                 records=len(journal.records) - len(kept))
        journal.records = kept


def settle(store: Store, net: Host, key: str, log: HookLog, *, dry_run: bool = False,
           only_index: int | None = None) -> tuple[list[Action], Teardown | None]:
    """Bring one journal in line with the host; the caller holds the NIC's locks.

    - an ifup that never finished (state `applying` while we hold its lock: its
      process died): roll it back;
    - a device that is gone: undo the plug (context `vanished`);
    - records whose undo failed before: retry them, unless a live record of the same
      plug claims the same thing again.
    `only_index`: the agent's case, act only if the journal's plug was on that ifindex.
    """
    journal = txn.load(store, key, log, move_aside=not dry_run, event="sweep")
    if isinstance(journal, txn.Unreadable):
        return [Action(key, "corrupt", journal.line(), ok=False)], None
    if journal is None:
        return [], None
    name = label(journal)
    if only_index is not None and journal.ifindex != only_index:
        return [], None  # a newer plug of the NIC on a new device: not ours to touch
    device = device_state(net, journal)
    log.bind(instance=journal.instance, uuid=journal.key, tap=journal.tap)
    if journal.state == State.APPLYING or device == GONE:
        what = "rolled-back" if journal.state == State.APPLYING and device != GONE else "undone"
        why = ("its ifup was interrupted" if what == "rolled-back"
               else f"device {journal.tap} (ifindex {journal.ifindex}) is gone")
        if dry_run:
            return [Action(name, what, f"would undo {len(journal.records)} records: {why}")], None
        log.info("sweep", result=what, cause=why, records=len(journal.records))
        _drop_claimed_by_others(store, journal, log)
        # ifdown scripts once per plug, whoever tears it down; none for an ifup that
        # never finished (its ifup scripts did not all run either).
        teardown = (Teardown(journal.tap, dict(journal.variables))
                    if what == "undone" and not journal.down_scripts_ran else None)
        if teardown:
            journal.down_scripts_ran = True  # saved with the records that failed, if any
        records = len(journal.records)
        failed = txn.undo_records(net, journal.records, log)
        txn.keep_only(store, journal, failed, log)
        if failed:
            return [Action(name, "failed", f"{why}; could not undo: {txn.failed_text(failed)}",
                           ok=False)], teardown
        return [Action(name, what, f"{why}; undid {records} records")], teardown
    if device == RENAMED:
        return [Action(name, "kept", f"ifindex {journal.ifindex} is no longer called "
                       f"{journal.tap}; left alone", ok=False)], None
    # A failed record carried into a newer plug of the NIC may name what that plug now
    # uses (a rule by tap name, the port by name, the flows by cookie): retry it only if
    # no live record of the same kind could be the same thing.
    retry = [r for r in journal.records if r.status == Status.FAILED
             and not any(o.status != Status.FAILED and o.kind == r.kind for o in journal.records)]
    owner = store.tap_owner(journal.tap)
    if owner is not None and owner != journal.key:
        retry = [r for r in retry if not kinds.by_tap_name(r)]
    if not retry:
        return [], None
    if dry_run:
        return [Action(name, "retried", f"would retry {len(retry)} failed undo records")], None
    still = txn.undo_records(net, retry, log)
    journal.records = [r for r in journal.records if r not in retry or r in still]
    if journal.state == State.UNDO_FAILED and not journal.records:
        # The journal was kept only for these records: the NIC is fully undone now.
        store.forget(journal.key, journal.tap)
    else:
        store.save(journal)
    if still:
        return [Action(name, "failed", f"retried undo still fails: {txn.failed_text(still)}",
                       ok=False)], None
    return [Action(name, "retried", f"undid {len(retry)} records that had failed before")], None


def run_teardowns(settings: Settings, teardowns: list[Teardown], log: HookLog) -> None:
    """The administrator's ifdown scripts for NICs undone late, context `vanished`."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    for t in teardowns:
        run_custom(settings.conf_dir, settings.script_timeout, t.tap, env, t.variables,
                   "down", "vanished", log, stop_on_failure=False)
