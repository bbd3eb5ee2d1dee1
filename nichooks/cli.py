"""`nichooks` subcommands for operators: plan, status, verify, sweep, agent, try, and the
hooks by name."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from nichooks.entry import kvm_ifdown, kvm_ifup
from nichooks.errors import EXIT_INVALID, EXIT_OK, EXIT_PLUMBING
from nichooks.guard import run_guarded, single_line


def _plan(args: argparse.Namespace) -> int:
    from nichooks import settings as settingsmod
    from nichooks.callers.ganeti import nic_for_ifup
    from nichooks.host.host import Host
    from nichooks.modes import registry

    settings = settingsmod.load(os.environ)
    nic, _ignored = nic_for_ifup(os.environ, args.tap, settings.specs_dir)
    net = Host(settings)
    try:
        plan = registry.get(nic.mode).plan(nic, net, settings)
    finally:
        net.close()
    if args.json:
        print(json.dumps({"nic": {"instance": nic.instance, "uuid": nic.uuid, "tap": nic.tap,
                                  "mode": nic.mode, "link": nic.link, "mac": nic.mac,
                                  "vlan": nic.vlan.canonical() if nic.vlan else None},
                          "steps": plan.as_data(), "notes": plan.notes,
                          "announce": [{"dev": d, "addr": a} for d, a in plan.announcements],
                          "deferred": plan.deferred}, indent=2))
    else:
        print(plan.text())
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from nichooks import settings as settingsmod
    from nichooks.engine.store import Store
    from nichooks.host.host import Host
    from nichooks.ops.verify import check_records

    settings = settingsmod.load(os.environ)
    store = Store(settings.state_dir)
    store.check()
    net = Host(settings)
    rows: list[dict[str, Any]] = []
    try:
        for key, journal in store.journals():
            if journal is None:
                rows.append({"key": key, "error": "unreadable journal"})
                continue
            items = [{"step": c.record.step, "present": c.present, "status": c.record.status}
                     for c in check_records(net, journal)]
            rows.append({"key": key, "instance": journal.instance, "uuid": journal.key,
                         "tap": journal.tap, "mode": journal.mode, "link": journal.link,
                         "state": journal.state, "context": journal.context, "items": items})
    finally:
        net.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no NICs journaled in {store.nics}")
    for row in rows:
        if "error" in row:
            print(f"{row['key']}: {row['error']}")
            continue
        print(single_line(f"{row['instance']} {row['tap']} uuid={row['uuid']} mode={row['mode']} "
                          f"link={row['link'] or '-'} state={row['state']}"))
        for item in row["items"]:
            mark = {True: "present", False: "MISSING", None: "unknown"}[item["present"]]
            extra = " (undo failed before)" if item["status"] == "failed" else ""
            print(single_line(f"    [{mark}] {item['step']}{extra}"))
    return EXIT_OK


def _sweep(args: argparse.Namespace) -> int:
    from nichooks import settings as settingsmod
    from nichooks.log import HookLog
    from nichooks.ops.sweep import sweep

    settings = settingsmod.load(os.environ)
    log = HookLog(verbose=args.verbose or settings.debug, context="sweep")
    actions = sweep(settings, dry_run=args.dry_run, log=log)
    for action in actions:
        print(single_line(action.line()))
    failed = [a for a in actions if a.what in ("failed", "corrupt")]
    print(f"sweep{' (dry run)' if args.dry_run else ''}: {len(actions)} findings, "
          f"{len(failed)} failed")
    return EXIT_PLUMBING if failed else EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from nichooks import settings as settingsmod
    from nichooks.engine import transaction as txn
    from nichooks.engine.locks import locked
    from nichooks.engine.store import Store
    from nichooks.host.host import Host
    from nichooks.log import HookLog
    from nichooks.ops.settle import label
    from nichooks.ops.verify import drift, repair, select

    settings = settingsmod.load(os.environ)
    store = Store(settings.state_dir)
    store.check()
    log = HookLog(verbose=args.verbose or settings.debug, context="verify")
    net = Host(settings)
    drifted = 0
    try:
        keys = select(store, args.nic)
        for key in keys:
            with locked(store, key, settings.lock_timeout):
                journal = txn.load(store, key, log, move_aside=False)  # the sweep's job
                if isinstance(journal, txn.Unreadable):
                    drifted += 1
                    print(single_line(f"DRIFT {key}: unreadable journal: {journal.cause}"))
                    continue
                if journal is None:
                    continue
                found = drift(net, settings, journal)
                if found and args.repair:
                    for action in repair(store, net, settings, key, log):
                        print(single_line(f"  {action.line()}"))
                    journal = store.load(key) or journal
                    found = drift(net, settings, journal)
            if found:
                drifted += 1
                print(single_line(f"DRIFT {label(journal)}"))
                for line in found:
                    print(single_line(f"    {line}"))
            else:
                print(single_line(f"ok    {label(journal)}"))
    finally:
        net.close()
    if not keys:
        print(f"no NICs journaled in {store.nics}")
    return EXIT_PLUMBING if drifted else EXIT_OK


def _agent(args: argparse.Namespace) -> int:
    from nichooks.serve.process import main as agent_main

    if args.no_serve and args.no_watch:
        print("nichooks: agent: --no-serve and --no-watch leave nothing to do", file=sys.stderr)
        return EXIT_INVALID
    return agent_main(foreground=args.foreground, verbose=args.verbose, serve=not args.no_serve,
                      watch=not args.no_watch)


def _announce(args: argparse.Namespace) -> int:
    from nichooks import settings as settingsmod
    from nichooks.model import validate
    from nichooks.ops.plug import switchover

    settings = settingsmod.load(os.environ)
    tap = validate.ifname("argument TAP", args.tap or os.environ.get("INTERFACE", ""))
    switchover(settings, tap, verbose=args.verbose)
    return EXIT_OK


def _install(args: argparse.Namespace) -> int:
    from nichooks.install import run

    return run(args)


def _config(args: argparse.Namespace) -> int:
    from nichooks import settings as settingsmod

    settings = settingsmod.load(os.environ)
    rows = settingsmod.effective(os.environ)
    if args.json:
        print(json.dumps([{"name": n, "value": v, "source": s} for n, v, s in rows], indent=2))
        return EXIT_OK
    print(f"# settings file: {settings.conf_dir / 'nichooks.conf'}")
    width = max(len(n) for n, _v, _s in rows)
    for name, value, source in rows:
        print(f"{name:<{width}} = {value:<36} # {source}")
    return EXIT_OK


def _try(args: argparse.Namespace) -> int:
    from nichooks.demo import run_demo

    return run_demo(keep_going=args.no_pause)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nichooks", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="show what ifup would do for a NIC, changing nothing")
    p.add_argument("tap", nargs="?", help="the tap (else INTERFACE); NIC data from the "
                   "environment when MODE is set, else from the tap's spec file")
    p.add_argument("--json", action="store_true", help="the plan as data")
    p.set_defaults(fn=_plan)
    p = sub.add_parser("status", help="journaled NICs and whether each item is still in place")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_status)
    p = sub.add_parser("sweep", help="reconcile every journal with the kernel and OVSDB: undo "
                       "NICs whose device is gone, retry failed undos, delete orphan OVS ports/flows")
    p.add_argument("--dry-run", action="store_true", help="report what would be done, do nothing")
    p.set_defaults(fn=_sweep)
    p = sub.add_parser("verify", help="read back every journaled item; exit 1 on drift")
    p.add_argument("nic", nargs="?", help="a tap name or NIC UUID (default: every NIC)")
    p.add_argument("--repair", action="store_true",
                   help="re-apply, from the journal, what no longer reads back")
    p.set_defaults(fn=_verify)
    p = sub.add_parser("agent", help="serve hook calls warm on <state dir>/agent.sock; watch "
                       "for NICs that vanish without an ifdown and for plumbing someone else "
                       "removed; undo or re-apply from the journals")
    p.add_argument("--foreground", action="store_true",
                   help="do not daemonize; log to stderr (for systemd)")
    p.add_argument("--no-serve", action="store_true",
                   help="do not serve hook calls (every hook then runs in its own process)")
    p.add_argument("--no-watch", action="store_true",
                   help="only serve hook calls: leave vanished NICs and drift to `nichooks "
                   "sweep` and `nichooks verify --repair`")
    p.set_defaults(fn=_agent)
    p = sub.add_parser("announce", help="routed NIC on a migration target after switchover: "
                       "add the held-back uplink proxy entries and announce the addresses")
    p.add_argument("tap")
    p.set_defaults(fn=_announce)
    p = sub.add_parser("config", help="the effective settings and where each came from")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_config)
    for verb, help_text in (("install", "put the entry points where Ganeti and Xen look for them"),
                            ("uninstall", "remove only what install made; restore backups")):
        p = sub.add_parser(verb, help=help_text)
        p.add_argument("--ganeti", action="store_true", help="Ganeti's hook paths (default: both)")
        p.add_argument("--xen", action="store_true", help="Xen's vif-custom (default: both)")
        p.add_argument("--root", default="/", help="install under this directory (default /)")
        p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
        if verb == "install":
            p.add_argument("--force", action="store_true",
                           help="move a file we did not make aside (<path>.nichooks-backup)")
            p.add_argument("--xen-path", help="where Xen's vif-ganeti looks "
                           "(default /etc/xen/scripts/vif-custom)")
        p.set_defaults(fn=_install, verb=verb)
    p = sub.add_parser("try", help="a self-contained demo in throwaway network namespaces")
    p.add_argument("--no-pause", action="store_true", help="(kept for scripts; the demo never waits)")
    p.set_defaults(fn=_try)
    for name, help_text in (("ifup", "kvm-ifup TAP"), ("ifdown", "kvm-ifdown TAP [CONTEXT]")):
        p = sub.add_parser(name, help=f"run the hook as {help_text} would")
        p.add_argument("args", nargs="*")
        p.set_defaults(fn=None, hook=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fn is None:
        hook = kvm_ifup if args.hook == "ifup" else kvm_ifdown
        return hook([f"nichooks {args.hook}", *args.args, *(["-v"] if args.verbose else [])])
    return run_guarded(lambda: int(args.fn(args)), args.verbose)


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["EXIT_PLUMBING", "main"]
