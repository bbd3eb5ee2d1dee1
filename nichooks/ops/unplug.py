"""ifdown: replay a NIC's journal backwards, best effort, then hand over to the
administrator's ifdown scripts, once per plug whoever tears it down."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack

from nichooks.engine import transaction as txn
from nichooks.engine.custom import run_custom
from nichooks.engine.locks import lock_nic
from nichooks.engine.store import Store
from nichooks.host.host import Host
from nichooks.log import HookLog
from nichooks.modes import registry  # noqa: F401  installs the loader of every record kind
from nichooks.settings import Settings

UP_CONTEXTS = ("start", "migrate", "hot-add")
DOWN_CONTEXTS = ("shutdown", "migrate", "migrate-failed", "hot-unplug", "vanished")


def ifdown(settings: Settings, key: str | None, tap: str | None, *, env: Mapping[str, str],
           context: str = "shutdown", verbose: bool = False) -> list[str]:
    """Undo the NIC journaled under `key`. Returns warning lines (what could not be
    undone); ifdown is best effort and does not fail for them."""
    store = Store(settings.state_dir)
    log = HookLog(verbose=verbose or settings.debug, tap=tap, context=context)
    warnings: list[str] = []
    variables: dict[str, str] | None = None
    net = Host(settings)
    try:
        if key is not None:
            store.ensure()
            with ExitStack() as stack:
                lock_nic(stack, store, key, tap, settings.lock_timeout, tap or key)
                more, variables = undo_journal(store, net, key, log, tap)
                warnings += more
    finally:
        net.close()
    if variables is None:
        # Torn down already (a sweep or the agent found its device gone and ran the
        # scripts then), or never plugged: the scripts run once per plug.
        log.info("ifdown", scripts="not run",
                 result="already torn down (by a sweep, the agent or an earlier ifdown, "
                 "which ran the ifdown scripts), never plugged, or unreadable")
        return warnings
    tap = tap or variables.get("INTERFACE") or ""
    for failure in run_custom(settings.conf_dir, settings.script_timeout, tap, env, variables,
                              "down", context, log, stop_on_failure=False):
        warnings.append(f"{tap}: custom script: {failure.reason}")
    return warnings


def undo_journal(store: Store, net: Host, key: str, log: HookLog,
                 tap: str | None = None) -> tuple[list[str], dict[str, str] | None]:
    """Replay one journal backwards; return (warnings, the NIC's plug-time variables
    for the ifdown scripts, or None when they must not run: no plug, or its scripts
    ran already). With `tap`, only a journal of a plug on that tap: the key was found
    before the lock was ours, and the NIC may have been re-plugged on another tap
    meanwhile (a hot-modify), whose plug this late ifdown must not undo."""
    journal = txn.load(store, key, log, event="ifdown")
    if isinstance(journal, txn.Unreadable):
        return [f"journal {key} is unreadable ({journal.cause}); moved to {journal.moved_to}, "
                "nothing undone"], None
    if journal is None:
        return [], None
    if tap is not None and journal.tap != tap:
        log.info("ifdown", journal=key, result="nothing journaled for this tap",
                 journal_tap=journal.tap)
        return [], None
    log.bind(instance=journal.instance, uuid=journal.key, tap=journal.tap)
    scripts = None if journal.down_scripts_ran else journal.variables
    records = len(journal.records)
    journal.down_scripts_ran = True  # they run right after the locks are released
    failed = txn.undo_records(net, journal.records, log)
    txn.keep_only(store, journal, failed, log)
    if failed:
        log.error("ifdown", result="incomplete", failed=len(failed))
        return [f"{journal.tap} ({journal.key}): could not undo {r.step}: {r.error}; "
                "kept in the journal for a later retry" for r in failed], scripts
    log.info("ifdown", result="ok", records=records)
    return [], scripts

