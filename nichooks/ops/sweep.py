"""`nichooks sweep`, and the agent's full pass: settle every journal with the host,
then let every mode find what its plugs left that no journal claims."""

from __future__ import annotations

from nichooks.engine.actions import Action
from nichooks.engine.locks import BUSY_TIMEOUT, locked
from nichooks.engine.store import Store
from nichooks.errors import LockTimeout
from nichooks.host.host import Host
from nichooks.log import HookLog
from nichooks.modes import registry
from nichooks.ops.settle import Teardown, run_teardowns, settle
from nichooks.settings import Settings


def sweep(settings: Settings, *, dry_run: bool, log: HookLog) -> list[Action]:
    store = Store(settings.state_dir)
    if not dry_run:
        store.ensure()
    net = Host(settings)
    actions: list[Action] = []
    teardowns: list[Teardown] = []
    try:
        for key in store.journal_keys():
            try:
                with locked(store, key, min(settings.lock_timeout, BUSY_TIMEOUT)):
                    done, teardown = settle(store, net, key, log, dry_run=dry_run)
            except LockTimeout:
                actions.append(Action(key, "busy", "a hook holds this NIC; left for the next sweep",
                                      ok=False))
                continue
            actions += done
            if teardown:
                teardowns.append(teardown)
        for mode in registry.every():
            actions += mode.orphans(store, net, settings, dry_run=dry_run, log=log)
    finally:
        net.close()
    if not dry_run:
        run_teardowns(settings, teardowns, log)
    return actions
