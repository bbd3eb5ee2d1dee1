"""`nichooks agent`: the long-lived watcher that finishes what no ifdown will.

Released Ganeti never calls an ifdown: a tap vanishes with its QEMU and leaves its
rules, routes, proxy entries, OVS port and flows behind. The agent reads the kernel's
link events and, for a journaled device that disappears, runs the NIC's undo (context
`vanished`) within milliseconds. It also puts back what someone else took away while
a NIC is live, from the journal: a tap detached from its bridge or a bridge deleted
and created again, an uplink whose proxy entries went with a down/up, an OVS port a
foreign `del-port` removed, flows an ovs-vswitchd restart dropped. Link events are
handled as they come; OVS is checked every NICHOOKS_AGENT_INTERVAL seconds (one
OVSDB select and one flow dump per bridge, whatever the number of NICs). It sweeps
when it starts, after any lost event, and every SWEEP_EVERY intervals.

Every action holds the NIC's locks and is decided from the journal's ifindex, so the
agent never touches a newer plug on a reused tap name. A hook never forks an agent of
its own: systemd starts it (share/nichooks-agent.service, or the first hook's
connection to share/nichooks-agent.socket), and nichooks/serve/process.py runs this
loop beside the hook server.
"""

from __future__ import annotations

import os
import select
import time
from typing import Any

from nichooks import settings as settingsmod
from nichooks.engine.actions import Action
from nichooks.engine.journal import CorruptJournal, Journal, State
from nichooks.engine.locks import locked
from nichooks.engine.store import Store
from nichooks.errors import LockTimeout
from nichooks.host.host import Host
from nichooks.host.linkwatch import LinkEvent, LinkWatch, Overflow
from nichooks.log import HookLog
from nichooks.modes import registry
from nichooks.ops.settle import Teardown, run_teardowns, settle
from nichooks.ops.sweep import sweep
from nichooks.ops.verify import intact, repair

SWEEP_EVERY = 15      # intervals between full sweeps (events lost without ENOBUFS)
BURST = 0.02          # seconds to gather a burst of events before acting on it
BUSY_RETRY = 0.25     # a NIC a hook holds is looked at again after this long
LOCK_WAIT = 0.5       # how long the agent waits for a hook to finish with a NIC
MAX_BACKOFF = 300.0   # seconds: the longest wait between repairs of a NIC that keeps failing


class Agent:
    def __init__(self, settings: settingsmod.Settings, *, verbose: bool = False) -> None:
        self.settings = settings
        self.verbose = verbose
        self.store = Store(settings.state_dir)
        self.store.ensure()
        self.net = Host(settings)
        self.watch = LinkWatch()
        self.stopping = False
        # device name -> (ifindex, up) of bridges and uplinks journals refer to
        self.seen: dict[str, tuple[int, bool]] = {}
        self.refs: dict[str, set[str]] = {}
        self.refs_stamp = -1
        # key -> ((inode, mtime) of its journal, the links it depends on)
        self.deps: dict[str, tuple[tuple[int, int], set[str]]] = {}
        self.taps: dict[str, tuple[int, bool, int | None]] = {}  # name -> (ifindex, up, master)
        self.later: dict[tuple[str, int | None], float] = {}  # (key, vanished index) -> when
        # NICs whose repair keeps failing: key -> (what failed last, attempts so far)
        self.failing: dict[str, tuple[str, int]] = {}

    def log(self, **fields: object) -> HookLog:
        return HookLog(verbose=self.verbose, context="agent", **fields)

    def report(self, actions: list[Action]) -> None:
        log = self.log()
        for action in actions:
            (log.info if action.ok else log.error)("agent", nic=action.nic, result=action.what,
                                                    detail=action.detail)

    # -- the loop ---------------------------------------------------------------------
    def run(self, wakeup: int | None = None) -> None:
        self.guarded(self.full_pass, "start")
        next_tick = time.monotonic() + self.settings.agent_interval
        ticks = 0
        while not self.stopping:
            timeout = max(0.0, min(next_tick, self._next_retry()) - time.monotonic())
            fds = [self.watch.fileno()] + ([wakeup] if wakeup is not None else [])
            ready = select.select(fds, [], [], timeout)[0]
            if wakeup is not None and wakeup in ready:
                os.read(wakeup, 512)
            if self.stopping:
                break
            if self.watch.fileno() in ready:
                try:
                    events = self.watch.read()
                    time.sleep(BURST)
                    events += self.watch.read()
                except Overflow:
                    self.log().warning("agent", result="events lost (ENOBUFS)", action="full sweep")
                    self.guarded(self.full_pass, "overflow")
                    continue
                self.guarded(self.handle, events)
            self.guarded(self._run_retries)
            if time.monotonic() >= next_tick:
                ticks += 1
                if ticks % SWEEP_EVERY == 0:
                    self.guarded(self.full_pass, "periodic")
                else:
                    self.guarded(self.audit)
                next_tick = time.monotonic() + self.settings.agent_interval

    def guarded(self, fn: Any, *args: Any) -> None:
        """Run one of the loop's actions; the agent outlives any failure of one (a
        journal of an unexpected shape, a full /run), which it logs."""
        try:
            fn(*args)
        except Exception as exc:
            self._reset_ovsdb()
            self.log().error("agent", result="internal error", action=getattr(fn, "__name__", "?"),
                             cause=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self.watch.close()
        self.net.close()

    # -- what the agent does -----------------------------------------------------------
    def full_pass(self, why: str) -> None:
        """Sweep, then re-apply drift on every live NIC."""
        self.report(sweep(self.settings, dry_run=False, log=self.log(why=why)))
        self._refresh_refs(force=True)
        for key in self.store.journal_keys():
            if not self._backing_off(key):
                self.repair(key)
        self.audit()

    def handle(self, events: list[LinkEvent]) -> None:
        """Event by event (a down and an up of an uplink often arrive in one burst),
        note what changed; then undo the vanished NICs, then repair the others."""
        self._refresh_refs()
        vanished: dict[str, int] = {}
        changed_taps: set[str] = set()
        repairs: set[str] = set()
        for event in events:
            name = event.name
            if event.deleted:
                vanished[name] = event.index
                if name in self.refs:  # only what journals depend on: bounded
                    self.seen[name] = (0, False)
                self.taps.pop(name, None)
                changed_taps.discard(name)
                continue
            # A tap matters when its master or up state changes on the same device; the
            # first sight of a device is a plug in progress, which its hook verifies.
            last = self.taps.get(name)
            self.taps[name] = (event.index, event.up, event.master)
            if last is not None and last[0] == event.index and last[1:] != (event.up, event.master):
                changed_taps.add(name)
            if name in self.refs:
                before = self.seen.get(name)
                self.seen[name] = (event.index, event.up)
                if before is not None and (event.index != before[0] or (event.up and not before[1])):
                    repairs |= self.refs[name]  # re-created, or up again: re-apply its NICs
        for name, index in vanished.items():
            key = self.store.tap_owner(name)
            if key:
                self.vanish(key, index)
        for name in changed_taps:
            key = self.store.tap_owner(name)
            if key:
                repairs.add(key)  # detached from its bridge, or down and up again
        for key in sorted(repairs):
            self.repair(key)

    def vanish(self, key: str, index: int | None) -> None:
        """Undo the NIC whose device (by ifindex) is gone, unless a newer plug owns it."""
        log = self.log(uuid=key)
        teardown: Teardown | None = None
        self.net.drop_ovsdb()
        try:
            with locked(self.store, key, LOCK_WAIT):
                actions, teardown = settle(self.store, self.net, key, log, only_index=index)
        except LockTimeout:
            self.later[(key, index)] = time.monotonic() + BUSY_RETRY
            return
        except Exception as exc:  # the agent outlives any one NIC's failure
            self._reset_ovsdb()
            log.error("agent", result="undo failed", cause=str(exc) or type(exc).__name__)
            return
        self.report(actions)
        if teardown:
            run_teardowns(self.settings, [teardown], log)

    def repair(self, key: str) -> None:
        log = self.log(uuid=key)
        self.net.drop_ovsdb()
        try:
            if intact(self.store, self.net, key, log):
                if key in self.failing:
                    attempts = self.failing.pop(key)[1]
                    log.info("agent", result="repaired", after_failures=attempts)
                return
            with locked(self.store, key, 0.05):
                actions = repair(self.store, self.net, self.settings, key, log, quick=True)
        except LockTimeout:
            # A hook (or verify, or a sweep) has the NIC: look again shortly, the drift
            # may have happened after that hook's own read-back.
            self.later[(key, -1)] = time.monotonic() + BUSY_RETRY
            return
        except Exception as exc:
            self._reset_ovsdb()
            self._repair_failed(key, str(exc) or type(exc).__name__, log)
            return
        self.report([a for a in actions if a.ok])
        failed = [a for a in actions if not a.ok]
        if failed:
            self._repair_failed(key, "; ".join(a.line() for a in failed), log)
        elif key in self.failing:
            attempts = self.failing.pop(key)[1]
            log.info("agent", result="repaired", after_failures=attempts)

    def _repair_failed(self, key: str, detail: str, log: HookLog) -> None:
        """Retry with a doubling delay, and say so once per new cause: a NIC that cannot
        be repaired (its bridge replaced by something that is not a bridge) must not
        cost a repair and an error line every interval for ever."""
        last, attempts = self.failing.get(key, ("", 0))
        attempts += 1
        self.failing[key] = (detail, attempts)
        delay = min(self.settings.agent_interval * 2 ** min(attempts - 1, 20), MAX_BACKOFF)
        if detail != last:
            log.error("agent", result="repair failed", detail=detail,
                      next_try=f"{delay:g}s, then less often; logged again only if the cause changes")
        self.later[(key, -1)] = time.monotonic() + delay

    def _backing_off(self, key: str) -> bool:
        return key in self.failing and self.later.get((key, -1), 0.0) > time.monotonic()

    def audit(self) -> None:
        """Every mode's cheap bulk audit of its live NICs (OVS: one OVSDB select and one
        flow dump per bridge, however many NICs there are); a NIC found missing
        something is repaired."""
        by_mode: dict[str, list[Journal]] = {}
        for _key, journal in self.store.journals():
            if journal is not None and journal.state == State.APPLIED:
                by_mode.setdefault(journal.mode, []).append(journal)
        for name, journals in sorted(by_mode.items()):
            mode = registry.find(name)
            if mode is None:
                continue
            try:
                missing = mode.audit(journals, self.net, self.settings)
            except Exception as exc:
                self.log().warning("agent", result=f"cannot audit {name} NICs", cause=str(exc))
                self._reset_ovsdb()
                continue
            for key in sorted(missing):
                if not self._backing_off(key):
                    self.repair(key)

    # -- bookkeeping ---------------------------------------------------------------------
    def _refresh_refs(self, force: bool = False) -> None:
        """Which bridges and uplinks each journal depends on. Only journals written
        since the last look are read again (by their mtime): during a node evacuation
        hundreds of plugs each change the directory, and reading every journal on each
        of them would cost the agent O(NICs^2)."""
        try:
            stamp = os.stat(self.store.nics).st_mtime_ns
        except FileNotFoundError:
            stamp = 0
        if stamp == self.refs_stamp and not force:
            return
        self.refs_stamp = stamp
        if force:
            self.deps.clear()
        seen: dict[str, tuple[int, int]] = {}
        for key in self.store.journal_keys():
            try:
                info = os.stat(self.store.path(key))
            except OSError:
                continue
            seen[key] = (info.st_ino, info.st_mtime_ns)  # a save renames a new file in
        for key in set(self.deps) - set(seen):
            del self.deps[key]
        for key, mtime in seen.items():
            if key in self.deps and self.deps[key][0] == mtime:
                continue
            try:
                journal = self.store.load(key)
            except CorruptJournal:
                journal = None
            self.deps[key] = (mtime, _depends_on(journal) if journal is not None else set())
        refs: dict[str, set[str]] = {}
        for key, (_mtime, names) in self.deps.items():
            for name in names:
                refs.setdefault(name, set()).add(key)
        self.refs = refs
        # Forget what no journal refers to any more: these tables stay as small as the
        # set of live NICs, however many devices come and go.
        self.seen = {name: state for name, state in self.seen.items() if name in refs}
        self.failing = {k: v for k, v in self.failing.items() if k in seen}
        for name in refs:
            if name not in self.seen:
                state = self.net.netlink.find(name)
                self.seen[name] = (state.index, state.up) if state else (0, False)

    def _next_retry(self) -> float:
        return min(self.later.values(), default=float("inf"))

    def _run_retries(self) -> None:
        now = time.monotonic()
        due = [k for k, when in self.later.items() if when <= now]
        for key, index in due:
            del self.later[(key, index)]
            if index == -1:
                self.repair(key)
            else:
                self.vanish(key, index)

    def _reset_ovsdb(self) -> None:
        """After an OVSDB error the IDL connection may be dead (ovsdb-server restarted):
        open a fresh one on next use."""
        try:
            self.net.close()
        except Exception:
            pass
        self.net = Host(self.settings)


def _depends_on(journal: Journal) -> set[str]:
    mode = registry.find(journal.mode)
    names = mode.watched_links(journal) if mode else set()
    return names - {journal.tap, "", "None"}
