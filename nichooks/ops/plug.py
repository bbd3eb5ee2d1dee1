"""ifup: lock, converge, plan, apply with a write-ahead journal, verify, commit with
the custom scripts; and `nichooks announce`, a routed plug's switchover.

A function of (settings, a validated NIC, the scripts' environment, a context) with
no global state, so that it runs the same in a hook process and inside a warm agent.
Where the NIC comes from is the callers' business (callers/).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack

from nichooks.engine import transaction as txn
from nichooks.engine.custom import run_custom
from nichooks.engine.journal import Journal, Record
from nichooks.engine.locks import lock_nic
from nichooks.engine.store import Store
from nichooks.errors import PlumbingError, cause
from nichooks.host.host import Host
from nichooks.log import HookLog
from nichooks.model.nic import Nic
from nichooks.modes import registry
from nichooks.settings import Settings


def ifup(settings: Settings, nic: Nic, *, env: Mapping[str, str], context: str | None = None,
         verbose: bool = False, ignored: Iterable[str] = ()) -> None:
    """Plug the NIC. `env` is the custom scripts' base environment; `ignored` names what
    a file set that is not a Ganeti NIC variable (logged, never used)."""
    store = Store(settings.state_dir)
    context = context or ("migrate" if nic.migration_phase else "start")
    log = HookLog(verbose=verbose or settings.debug, instance=nic.instance,
                  uuid=nic.uuid, tap=nic.tap, context=context, mode=nic.mode)
    for where in ignored:
        log.warning("source", ignored=where, result="not a Ganeti NIC variable")
    store.ensure()
    mode = registry.get(nic.mode)
    net = Host(settings)
    try:
        net.open()  # pyroute2's import and socket before the lock, not while holding it
        with ExitStack() as stack:
            lock_nic(stack, store, nic.key, nic.tap, settings.lock_timeout, nic.label())
            # Preflight before converging: a refused ifup must leave an earlier plug
            # of the NIC (hot-modify to a bad LINK) exactly as it was.
            plan = mode.plan(nic, net, settings)
            converged, carried = converge(store, net, nic, log)
            if converged:
                plan = mode.plan(nic, net, settings)  # again: undoing changed the tap
            for note in plan.notes:
                log.info("plan", note=note)
            tap_state = net.netlink.find(nic.tap)
            journal = Journal(key=nic.key, tap=nic.tap, mode=nic.mode, instance=nic.instance,
                              link=nic.link, ifindex=tap_state.index if tap_state else None,
                              context=context, variables=dict(nic.variables),
                              records=list(carried), deferred=list(plan.deferred))
            store.save(journal)
            plug = txn.Transaction(store, net, journal, log, nic.label(), len(carried))
            try:
                store.claim_tap(nic.tap, nic.key)
            except PlumbingError as exc:  # e.g. a directory where the tap's entry goes
                plug.rollback(exc.cause, "journal")
            plug.apply(plan.steps)
            plug.verify(plan.steps)
            mode.after_verify(plan, settings, log)

            def scripts() -> list[str]:
                return [f.reason for f in run_custom(
                    settings.conf_dir, settings.script_timeout, nic.tap, env, nic.variables,
                    "up", context, log, stop_on_failure=True)]

            plug.commit(scripts)
            log.info("ifup", result="ok", steps=len(plan.steps))
    finally:
        net.close()


def converge(store: Store, net: Host, nic: Nic, log: HookLog) -> tuple[bool, list[Record]]:
    """Undo any earlier plug of this NIC, and any other NIC's plug that claimed this
    tap name. Returns (whether anything was undone, the records of our own NIC that
    could not be undone: the new journal carries them so a later ifdown retries)."""
    carried: list[Record] = []
    undone = False
    keys = [nic.key]
    owner = store.tap_owner(nic.tap)
    if owner and owner != nic.key:
        keys.append(owner)
    for key in keys:
        journal = txn.load(store, key, log, event="converge")
        if not isinstance(journal, Journal):
            store.release_tap(nic.tap, key)
            continue
        log.info("converge", journal=key, old_tap=journal.tap, records=len(journal.records))
        undone = undone or bool(journal.records)
        failed = txn.undo_records(net, journal.records, log)
        store.release_tap(journal.tap, key)
        if key == nic.key:
            carried = failed
            store.delete(key)  # the new journal, written next, carries what failed
        else:
            txn.keep_only(store, journal, failed, log, must_save=True)
    return undone, carried


def switchover(settings: Settings, tap: str, *, verbose: bool = False) -> None:
    """`nichooks announce TAP`: on a migration target after switchover, apply what the
    plug held back until then and announce the NIC's addresses."""
    store = Store(settings.state_dir)
    store.check()
    key = store.tap_owner(tap)
    if key is None:
        raise PlumbingError(f"no NIC is journaled on tap {tap}", nic=tap, step="announce")
    log = HookLog(verbose=verbose or settings.debug, tap=tap, context="announce")
    net = Host(settings)
    try:
        with ExitStack() as stack:
            lock_nic(stack, store, key, tap, settings.lock_timeout, tap)
            journal = txn.load(store, key, log, move_aside=False)
            if isinstance(journal, txn.Unreadable):
                raise PlumbingError(f"journal {key} is unreadable: {journal.cause}", nic=tap)
            mode = registry.find(journal.mode) if journal is not None else None
            if journal is None or mode is None:
                raise PlumbingError("not a routed NIC journaled by nichooks", nic=tap,
                                    step="announce")
            steps = mode.held_back(journal, settings)
            label = f"{journal.instance} {tap} ({key})"
            for step in steps:
                try:
                    txn.write_ahead(store, net, journal, step)
                except Exception as exc:
                    raise PlumbingError(cause(exc), nic=label, step=step.describe()) from None
            journal.deferred = []
            store.save(journal)
            mode.after_switchover(journal, settings, log)
    finally:
        net.close()
