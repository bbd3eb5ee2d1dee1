"""ifup and ifdown: lock, converge, plan, apply with a write-ahead journal, verify,
hand over to custom scripts; or replay the journal backwards.

The core is a function from a request (the caller's variables, argv's tap, a
context) to a result, with no global state, so it can later run inside a warm
agent process unchanged (DESIGN §2 "Speed").
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NoReturn

from nichooks import settings as settingsmod
from nichooks.engine.journal import CorruptJournal, Journal, JournalWriteError, Record, Store, check_key
from nichooks.engine.locks import acquire, lock_names
from nichooks.engine.plan import UNDO, Plan, Step, load_backends
from nichooks.errors import InvalidInput, NicHooksError, PlumbingError
from nichooks.host.host import Host
from nichooks.host.netlink import NetlinkError
from nichooks.log import HookLog
from nichooks.model import nic as nicmod
from nichooks.model import validate

if TYPE_CHECKING:
    from nichooks.engine.custom import ScriptFailure

UP_CONTEXTS = ("start", "migrate", "hot-add")
DOWN_CONTEXTS = ("shutdown", "migrate", "migrate-failed", "hot-unplug", "vanished")
# Ganeti's ifdown design: `true` = node-local cleanup only, `false` = hot-unplug.
GANETI_DOWN_ARGS = {"true": "shutdown", "false": "hot-unplug"}


@dataclass(frozen=True)
class Request:
    env: Mapping[str, str]
    tap: str | None = None       # argv[1]; informational when INTERFACE is set
    context: str | None = None
    verbose: bool = False
    device: str = ""  # a second device of the NIC (Xen HVM "emu" tap): its own journal key
    # The NIC's variables when a file supplied them (a Xen NIC file), already limited to
    # Ganeti's names. `env` is then the real process environment: the only source of
    # settings and of the custom scripts' base environment.
    variables: Mapping[str, str] | None = None


# -- where the NIC comes from ---------------------------------------------------
def nic_for_ifup(request: Request,
                 settings: settingsmod.Settings) -> tuple[nicmod.Nic, list[str]]:
    """(the NIC, names a file set that are not Ganeti's and were ignored).

    The variables a file supplied (Xen), else the environment when MODE is set
    (Ganeti), else the spec file for the tap (plain QEMU `script=`)."""
    env, tap_arg = request.env, request.tap
    if request.variables is not None:
        return nicmod.from_variables(request.variables, tap=tap_arg), []
    if env.get("MODE"):
        return nicmod.from_variables(env, tap=tap_arg), []
    interface = env.get("INTERFACE")
    if interface:
        tap = validate.ifname("INTERFACE", interface)
    elif tap_arg:
        tap = validate.ifname("argument TAP", tap_arg)
    else:
        raise InvalidInput("INTERFACE", "is not set and no TAP argument was given")
    spec = settings.specs_dir / tap
    from nichooks.callers.shellvars import read_assignments

    found = read_assignments(spec)  # a regular file only: a FIFO must not hang QEMU
    if found is None:
        raise InvalidInput("MODE", f"is not set and there is no spec file {spec}")
    variables, ignored = nicmod.ganeti_only(found)
    variables["INTERFACE"] = tap  # the device is the one QEMU named, whatever the file says
    for name in ("MIGRATION_PHASE",):
        if env.get(name):
            variables.setdefault(name, env[name])
    return nicmod.from_variables(variables, tap=tap), [f"{spec}: {name}" for name in ignored]


def build_plan(nic: nicmod.Nic, net: Host, settings: settingsmod.Settings) -> Plan:
    """Preflight and plan for the NIC's mode; raises before anything is changed."""
    if nic.mode == "bridged":
        from nichooks.modes import bridged as bridge

        return bridge.plan(nic, net)
    if nic.mode == "openvswitch":
        from nichooks.modes import openvswitch

        return openvswitch.plan(nic, net, settings)
    if nic.mode == "routed" and nic.device:
        # Only the NIC's main device carries the routes and proxies; the guest talks
        # through one of the two at a time (the emulated NIC until its PV driver loads).
        from nichooks.host.steps.link import SetLink

        return Plan(mode="routed", nic_label=nic.label(), steps=[SetLink(nic.tap, "up", True)],
                    notes=[f"routed: {nic.tap} is a second device of the NIC; only its main "
                           "device carries the routes"])
    if nic.mode == "routed":
        from nichooks.modes import routed

        return routed.plan(nic, net, settings)
    if nic.mode == "ext":
        # Ganeti 3.2's `ext` mode: the administrator's scripts do all the work.
        return Plan(mode="ext", nic_label=nic.label(),
                    notes=["ext mode: only the custom scripts run"])
    raise PlumbingError(f"MODE={nic.mode} is not supported by this version of nichooks",
                        nic=nic.label(), step="preflight")


# -- undo -------------------------------------------------------------------------
def undo_records(net: Host, records: list[Record], log: HookLog) -> list[Record]:
    """Undo records in reverse, each independently (best effort); return the ones
    that failed, in journal order, marked failed with the cause."""
    load_backends()
    failed: list[Record] = []
    for record in reversed(records):
        fn = UNDO.get(record.kind)
        try:
            if fn is None:
                raise ValueError(f"no undo for record kind {record.kind!r}")
            fn(net, record.undo)
        except Exception as exc:  # best effort: one failure must not stop the rest
            record.status, record.error = "failed", _cause(exc)
            failed.append(record)
            log.error("undo", step=record.step, result="failed", cause=record.error)
        else:
            log.info("undo", step=record.step, result="ok")
    failed.reverse()
    return failed


def _cause(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return f"{exc} (errno {exc.code})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__


# -- locking --------------------------------------------------------------------------
def _journal_tap(store: Store, key: str) -> str | None:
    try:
        journal = store.load(key)
    except CorruptJournal:
        return None
    return journal.tap if journal else None


def _lock_set(store: Store, key: str | None, tap: str | None) -> list[str]:
    """Every lock a call on (key, tap) needs: the NIC, its tap, the tap its journal
    names (hot-modify moved it), and the NIC that last claimed the tap name."""
    keys, taps = set(), set()
    if key:
        keys.add(key)
        old_tap = _journal_tap(store, key)
        if old_tap:
            taps.add(old_tap)
    if tap:
        taps.add(tap)
        owner = store.tap_owner(tap)
        if owner:
            keys.add(owner)
    return lock_names(keys, taps)


def _remove_unused_locks(store: Store, names: list[str]) -> None:
    """Delete the lock files of a NIC whose journal is gone and of a tap no journal
    claims, so that a host that has run thousands of guests does not keep thousands
    of lock files. Safe only while we hold them: a waiter that then gets the lock on
    the unlinked file sees it has no name any more and opens the path again
    (filelock's st_nlink check), so no two callers ever hold one name at once."""
    for name in names:
        kind, _sep, what = name.partition("-")
        unused = not store.exists(what) if kind == "nic" else store.tap_owner(what) is None
        if unused:
            try:
                (store.locks / f"{name}.lock").unlink()
            except OSError:
                pass


def lock_nic(stack: ExitStack, store: Store, key: str | None, tap: str | None,
             timeout: float, label: str) -> None:
    """Take the lock set, re-checking it did not change while we waited."""
    for _ in range(8):
        names = _lock_set(store, key, tap)
        inner = ExitStack()
        acquire(inner, store.locks, names, timeout, label)
        if _lock_set(store, key, tap) == names:
            # Runs first on exit, while every lock is still held.
            inner.callback(_remove_unused_locks, store, names)
            stack.push(inner)
            return
        inner.close()
    raise PlumbingError("the NIC's journal kept changing while waiting for its locks",
                        nic=label, step="lock")


# -- ifup -----------------------------------------------------------------------------
def _converge(store: Store, net: Host, nic: nicmod.Nic,
              log: HookLog) -> tuple[bool, list[Record]]:
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
        try:
            journal = store.load(key)
        except CorruptJournal as exc:
            dest = store.quarantine(key)
            log.warning("converge", journal=key, result="corrupt", moved_to=dest, cause=exc)
            continue
        if journal is None:
            store.release_tap(nic.tap, key)
            continue
        log.info("converge", journal=key, old_tap=journal.tap, records=len(journal.records))
        undone = undone or bool(journal.records)
        failed = undo_records(net, journal.records, log)
        store.release_tap(journal.tap, key)
        if key == nic.key:
            carried = failed
            store.delete(key)
        elif failed:
            journal.records, journal.state = failed, "undo-failed"
            store.save(journal)
        else:
            store.delete(key)
    return undone, carried


def ifup(request: Request) -> None:
    settings = settingsmod.load(request.env)
    store = Store(settings.state_dir)
    store.check()  # the spec file is read from it
    nic, ignored = nic_for_ifup(request, settings)
    if request.device:
        nic = replace(nic, device=request.device)
    context = request.context or ("migrate" if nic.migration_phase else "start")
    log = HookLog(verbose=request.verbose or settings.debug, instance=nic.instance,
                  uuid=nic.uuid, tap=nic.tap, context=context, mode=nic.mode)
    for where in ignored:
        log.warning("source", ignored=where, result="not a Ganeti NIC variable")
    store.ensure()
    net = Host(settings)
    try:
        net.ipr  # noqa: B018  pyroute2's import and socket before the lock, not while holding it
        with ExitStack() as stack:
            lock_nic(stack, store, nic.key, nic.tap, settings.lock_timeout, nic.label())
            # Preflight before converging: a refused ifup must leave an earlier plug
            # of the NIC (hot-modify to a bad LINK) exactly as it was.
            plan = build_plan(nic, net, settings)
            converged, carried = _converge(store, net, nic, log)
            if converged:
                plan = build_plan(nic, net, settings)  # again: undoing changed the tap
            for note in plan.notes:
                log.info("plan", note=note)
            tap_state = net.find(nic.tap)
            journal = Journal(key=nic.key, tap=nic.tap, mode=nic.mode, instance=nic.instance,
                              link=nic.link, ifindex=tap_state.index if tap_state else None,
                              context=context, variables=dict(nic.variables),
                              records=list(carried), deferred=list(plan.deferred))
            store.save(journal)
            try:
                store.claim_tap(nic.tap, nic.key)
            except PlumbingError as exc:  # e.g. a directory where the tap's entry goes
                _rollback(store, net, nic, journal, log, len(carried), exc.cause, "journal")
            _apply(store, net, nic, plan, journal, log, len(carried),
                   fault=request.env.get("NICHOOKS_TEST_FAULT", ""))
            _verify(store, net, nic, plan, journal, log, len(carried))
            announce(plan.announcements, log)
            _run_scripts_and_commit(store, net, nic, journal, log, len(carried),
                                    lambda: run_custom(settings, nic.tap, request.env,
                                                       nic.variables, "up", context, log,
                                                       stop_on_failure=True))
            log.info("ifup", result="ok", steps=len(plan.steps))
    finally:
        net.close()


def _run_scripts_and_commit(store: Store, net: Host, nic: nicmod.Nic, journal: Journal,
                            log: HookLog, first_new: int,
                            scripts: Callable[[], list[ScriptFailure]]) -> None:
    """Run the ifup scripts between preparing the `applied` journal and renaming it
    into place. Written before the scripts, the journal cannot be lost to a disk they
    fill; if it cannot be written at all, or the rename fails, the plug is rolled
    back: a journal left `applying` would make the next sweep undo a working NIC."""
    journal.state = "applied"
    try:
        final = store.prepare_save(journal)
    except JournalWriteError as exc:
        journal.state = "applying"
        _rollback(store, net, nic, journal, log, first_new, exc.cause, "journal")
    try:
        failures = scripts()
    except BaseException:
        final.discard()
        raise
    if failures:
        final.discard()
        journal.state = "applying"
        _rollback(store, net, nic, journal, log, first_new,
                  f"custom script failed: {failures[0].reason}", "custom script")
    try:
        final.commit()
    except JournalWriteError as exc:
        journal.state = "applying"
        _rollback(store, net, nic, journal, log, first_new,
                  f"{exc.cause} (the ifup scripts had run)", "journal")


def _apply(store: Store, net: Host, nic: nicmod.Nic, plan: Plan, journal: Journal,
           log: HookLog, first_new: int, fault: str = "") -> None:
    """Apply the steps in order, each one's undo record on disk before it runs.

    `fault` is a testing knob (NICHOOKS_TEST_FAULT): `fail-at:N` makes step N fail
    as if the kernel refused it, `fail-after:N` makes it fail once it was applied (a
    half-applied step: rollback must undo a change that really happened),
    `kill-after:N` SIGKILLs this process right after step N, and `drift:N` reverts
    step N's change with its own undo once every step is applied (as someone else
    would, behind our back), so its read-back fails. Tests prove rollback, the
    read-back and crash recovery at every point with them."""
    for number, step in enumerate(plan.steps, 1):
        facts: dict[str, object] = {}
        try:
            record = step.prepare(net)
            journal.records.append(record)
            store.save(journal)  # write-ahead: the undo is on disk before the change
            if fault == f"fail-at:{number}":
                raise RuntimeError("injected fault (NICHOOKS_TEST_FAULT)")
            facts = step.apply(net) or {}
            if fault == f"fail-after:{number}":
                raise RuntimeError("injected fault after the step was applied (NICHOOKS_TEST_FAULT)")
            if fault == f"kill-after:{number}":
                import os
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
        except BaseException as exc:
            cause = _cause(exc)
            log.error("step", step=step.describe(), result="failed", cause=cause)
            if not isinstance(exc, Exception):
                _rollback_quietly(store, net, nic, journal, log, first_new)
                raise
            _rollback(store, net, nic, journal, log, first_new, cause, step.describe())
        log.info("step", step=step.describe(), result="ok", **facts)
    if fault.startswith("drift:"):
        for number, record in enumerate(journal.records[first_new:], 1):
            if fault == f"drift:{number}":
                undo_records(net, [record], log)


def _verify(store: Store, net: Host, nic: nicmod.Nic, plan: Plan, journal: Journal,
            log: HookLog, first_new: int) -> None:
    """Read back what was applied (nmstate's apply-verify-commit)."""
    for step in plan.steps:
        mismatch = read_back(step, net)
        if mismatch:
            log.error("verify", step=step.describe(), result="mismatch", cause=mismatch)
            _rollback(store, net, nic, journal, log, first_new, f"read back: {mismatch}",
                      f"verify {step.describe()}")


def read_back(step: Step, net: Host) -> str | None:
    """What differs between the step and the host (None: nothing). Not being able to
    read it back is as bad as a mismatch."""
    try:
        return step.verify(net)
    except Exception as exc:
        return f"cannot read back: {_cause(exc)}"


def _rollback_quietly(store: Store, net: Host, nic: nicmod.Nic, journal: Journal,
                      log: HookLog, first_new: int) -> list[Record]:
    failed = undo_records(net, journal.records[first_new:], log)
    journal.records = journal.records[:first_new] + failed
    if journal.records:
        journal.state = "undo-failed"
        try:
            store.save(journal)
        except JournalWriteError as exc:
            # The journal on disk is the last complete one: it names every record
            # still listed here (and some already undone, whose undo is idempotent).
            log.error("journal", result="not saved", cause=exc.cause)
    else:
        store.forget(journal.key, journal.tap)
    return failed


def _rollback(store: Store, net: Host, nic: nicmod.Nic, journal: Journal, log: HookLog,
              first_new: int, cause: str, step: str) -> NoReturn:
    """Undo what this ifup applied and fail with one line."""
    failed = _rollback_quietly(store, net, nic, journal, log, first_new)
    if failed:
        cause += "; rollback incomplete, kept in the journal: " + "; ".join(
            f"{r.step} ({r.error})" for r in failed)
    raise PlumbingError(cause, nic=nic.label(), step=step)


def run_custom(settings: settingsmod.Settings, tap: str, env: Mapping[str, str],
                variables: Mapping[str, str], action: str, context: str, log: HookLog,
                *, stop_on_failure: bool) -> list[ScriptFailure]:
    from nichooks.engine import custom

    # Only the NIC's own variables, from a journal that may have been tampered with: never
    # PATH or LD_PRELOAD for root-run scripts, never a NUL that execve refuses.
    nic_vars = {k: v for k, v in variables.items()
                if k in nicmod.GANETI_VARS and "\0" not in v and "=" not in k}
    script_env = {**env, **nic_vars, "ACTION": action, "NICHOOKS_CONTEXT": context}
    return custom.run_scripts(settings.conf_dir / f"if{action}.d", tap, script_env,
                              settings.script_timeout, log, stop_on_failure=stop_on_failure)


def announce(announcements: list[tuple[str, str]], log: HookLog) -> None:
    """Tell upstream where the guest is now. Best effort: a plug that works is not rolled
    back because one announcement could not be sent (the router will ARP anyway)."""
    if not announcements:
        return
    from nichooks.host.announce import gratuitous_arp, unsolicited_na

    for dev, addr in announcements:
        try:
            (unsolicited_na if ":" in addr else gratuitous_arp)(dev, addr)
        except (OSError, NicHooksError) as exc:
            log.error("announce", dev=dev, addr=addr, result="failed", cause=_cause(exc))
        else:
            log.info("announce", dev=dev, addr=addr, result="ok")


def announce_now(request: Request) -> None:
    """`nichooks announce TAP`: after switchover on a migration target, add the uplink
    proxy entries ifup held back and announce every address of the NIC."""
    from nichooks.modes import routed

    settings = settingsmod.load(request.env)
    tap = validate.ifname("argument TAP", request.tap or request.env.get("INTERFACE", ""))
    store = Store(settings.state_dir)
    store.check()
    key = store.tap_owner(tap)
    if key is None:
        raise PlumbingError(f"no NIC is journaled on tap {tap}", nic=tap, step="announce")
    log = HookLog(verbose=request.verbose or settings.debug, tap=tap, context="announce")
    net = Host(settings)
    try:
        with ExitStack() as stack:
            lock_nic(stack, store, key, tap, settings.lock_timeout, tap)
            try:
                journal = store.load(key)
            except CorruptJournal as exc:
                raise PlumbingError(f"journal {key} is unreadable: {exc}", nic=tap) from None
            if journal is None or journal.mode != "routed":
                raise PlumbingError("not a routed NIC journaled by nichooks", nic=tap, step="announce")
            steps = routed.deferred_steps(journal.deferred, settings.route_proto)
            label = f"{journal.instance} {tap} ({key})"
            for step in steps:
                try:
                    record = step.prepare(net)
                    journal.records.append(record)
                    store.save(journal)
                    step.apply(net)
                except Exception as exc:
                    raise PlumbingError(_cause(exc), nic=label, step=step.describe()) from None
            pending = {(d["dev"], d["addr"]) for d in journal.deferred}
            journal.deferred = []
            store.save(journal)
            uplinks = [(r.undo["dev"], r.undo["addr"]) for r in journal.records
                       if r.kind == "route.proxy" and r.undo["ifindex"] != journal.ifindex]
            announce(sorted(set(uplinks) | pending) if settings.announce else [], log)
    finally:
        net.close()


# -- ifdown -----------------------------------------------------------------------------
def down_context(arg: str | None) -> str:
    if arg is None or arg == "":
        return "shutdown"  # QEMU's downscript: the tap is going away with its netdev
    if arg in GANETI_DOWN_ARGS:
        return GANETI_DOWN_ARGS[arg]
    if arg in DOWN_CONTEXTS:
        return arg
    raise InvalidInput("argument CONTEXT", f"{arg!r} is not one of: "
                       + ", ".join((*GANETI_DOWN_ARGS, *DOWN_CONTEXTS)))


def _find_key(env: Mapping[str, str], tap: str | None, store: Store,
              settings: settingsmod.Settings) -> str | None:
    raw = env.get("INTERFACE_UUID")
    if raw:
        key = validate.uuid("INTERFACE_UUID", raw)
        if store.exists(key) or not tap:
            return key
    if tap:
        owner = store.tap_owner(tap)
        if owner:
            return owner
        from nichooks.callers.ganeti_runtime import nic_env_for_tap

        found = nic_env_for_tap(settings.ganeti_run_dir, tap)
        if found and found.get("INTERFACE_UUID"):
            try:
                key = check_key(found["INTERFACE_UUID"].lower())
            except InvalidInput:
                return None
            return key if store.exists(key) else None
    return None


def ifdown(request: Request) -> list[str]:
    """Undo a NIC from its journal. Returns warning lines (what could not be undone);
    ifdown is best effort and does not fail for them."""
    settings = settingsmod.load(request.env)
    context = request.context or "shutdown"
    interface = request.env.get("INTERFACE")
    tap = validate.ifname("INTERFACE", interface) if interface else (
        validate.ifname("argument TAP", request.tap) if request.tap else None)
    if tap is None and not request.env.get("INTERFACE_UUID"):
        raise InvalidInput("TAP", "no tap given (argument or INTERFACE) and no INTERFACE_UUID")
    store = Store(settings.state_dir)
    store.check()
    log = HookLog(verbose=request.verbose or settings.debug, tap=tap, context=context)
    warnings: list[str] = []
    variables: dict[str, str] | None = None
    key = _find_key(request.env, tap, store, settings)
    net = Host(settings)
    try:
        if key is not None:
            store.ensure()
            with ExitStack() as stack:
                lock_nic(stack, store, key, tap, settings.lock_timeout, tap or key)
                more, variables = _undo_journal(store, net, key, log, tap)
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
    for failure in run_custom(settings, tap, request.env, variables, "down", context, log,
                               stop_on_failure=False):
        warnings.append(f"{tap}: custom script: {failure.reason}")
    return warnings


def _undo_journal(store: Store, net: Host, key: str, log: HookLog,
                  tap: str | None = None) -> tuple[list[str], dict[str, str] | None]:
    """Replay one journal backwards; return (warnings, the NIC's plug-time variables
    for the ifdown scripts, or None when they must not run: no plug, or its scripts
    ran already). With `tap`, only a journal of a plug on that tap: the key was found
    before the lock was ours, and the NIC may have been re-plugged on another tap
    meanwhile (a hot-modify), whose plug this late ifdown must not undo."""
    try:
        journal = store.load(key)
    except CorruptJournal as exc:
        dest = store.quarantine(key)
        log.error("ifdown", journal=key, result="corrupt", moved_to=dest)
        return [f"journal {key} is unreadable ({exc}); moved to {dest}, nothing undone"], None
    if journal is None:
        return [], None
    if tap is not None and journal.tap != tap:
        log.info("ifdown", journal=key, result="nothing journaled for this tap",
                 journal_tap=journal.tap)
        return [], None
    log.bind(instance=journal.instance, uuid=journal.key, tap=journal.tap)
    scripts = None if journal.down_scripts_ran else journal.variables
    failed = undo_records(net, journal.records, log)
    if failed:
        journal.records, journal.state = failed, "undo-failed"
        journal.down_scripts_ran = True  # they run right after the locks are released
        try:
            store.save(journal)
        except JournalWriteError as exc:  # the complete older journal stays: retried later
            log.error("journal", result="not saved", cause=exc.cause)
        log.error("ifdown", result="incomplete", failed=len(failed))
        return [f"{journal.tap} ({journal.key}): could not undo {r.step}: {r.error}; "
                "kept in the journal for a later retry" for r in failed], scripts
    store.forget(key, journal.tap)
    log.info("ifdown", result="ok", records=len(journal.records))
    return [], scripts


def print_warnings(lines: list[str]) -> None:
    from nichooks.entry import single_line

    for line in lines:
        print(f"nichooks: warning: {single_line(line)}", file=sys.stderr)


__all__ = [
    "NicHooksError",
    "Request",
    "build_plan",
    "down_context",
    "ifdown",
    "ifup",
    "nic_for_ifup",
    "undo_records",
]
