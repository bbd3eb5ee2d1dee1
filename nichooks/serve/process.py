"""The `nichooks agent` process: one instance per state directory, its hook server
(nichooks/serve/server.py) and its watch loop (nichooks/ops/agent.py).

Order matters. Everything a hook needs is imported first; then the server is forked,
so every call it serves starts warm; only then does the loop open its own netlink and
OVSDB connections, which no forked process may share.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib
import os
import select
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from nichooks import settings as settingsmod
from nichooks.errors import EXIT_OK, EXIT_PLUMBING, PlumbingError
from nichooks.log import HookLog

# What a hook imports lazily, imported once here so no call pays for it.
WARM = ("nichooks.callers.ganeti", "nichooks.callers.xen_vif", "nichooks.callers.xen",
        "nichooks.callers.ganeti_runtime", "nichooks.callers.shellvars", "nichooks.ops.plug",
        "nichooks.ops.unplug", "nichooks.ops.settle", "nichooks.ops.verify", "nichooks.engine.custom",
        "nichooks.host.host", "nichooks.host.netlink", "nichooks.host.announce",
        "nichooks.host.openflow", "nichooks.host.ovsdb", "nichooks.host.ovsdb_view",
        "nichooks.host.nft", "nichooks.host.steps.nftfilter", "nichooks.model.policy",
        "nichooks.safefile", "filelock", "pyroute2", "pyroute2.netlink.exceptions",
        "pyroute2.netlink.rtnl.ifinfmsg",
        "ovs.db.idl", "ovs.poller", "ovs.vlog", "configparser", "ipaddress", "json", "subprocess",
        "syslog", "traceback")
NFT_LIBRARY = "libnftables.so.1"  # what the binding's Nftables() loads by default


def entries() -> dict[str, Callable[[Sequence[str]], int]]:
    from nichooks import entry

    return {"kvm_ifup": entry.kvm_ifup, "kvm_ifdown": entry.kvm_ifdown,
            "vif_ganeti": entry.vif_ganeti}


def warm() -> None:
    """Import what a hook would, and open and close one rtnetlink socket (pyroute2
    imports most of itself on first use)."""
    for name in WARM:
        importlib.import_module(name)
    from nichooks.modes import registry

    registry.load_all()
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("get", index=1)
    _warm_nftables()


def _warm_nftables() -> None:
    """libnftables' Python binding and the library itself (with the libraries it
    links), loaded once so that a call that filters does not load them (~2 ms of each
    served ifup and ifdown). No context is made here: a context is the process's own.
    Without the binding nothing is loaded, and a call that filters fails as it would
    in-process."""
    from nichooks.host import nft

    with contextlib.suppress(PlumbingError, OSError):
        nft.binding()
        ctypes.CDLL(NFT_LIBRARY)


def _single_instance(state_dir: Path) -> int:
    """An flock held for the agent's lifetime (it survives daemonizing: the child
    inherits the open file)."""
    path = state_dir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = (state_dir / "agent.pid").read_text().strip() if (state_dir / "agent.pid").exists() else "?"
        raise PlumbingError(f"another nichooks agent is running (pid {pid}, lock {path})",
                            step="agent") from None
    return fd


def main(*, foreground: bool, verbose: bool, serve: bool = True, watch: bool = True) -> int:
    from nichooks.engine.store import Store
    from nichooks.serve import server

    settings = settingsmod.load(os.environ)
    Store(settings.state_dir).ensure()
    lock_fd = _single_instance(settings.state_dir)
    listener = server.inherited_listener(os.environ) if serve else None
    if not foreground:
        import daemon

        context = daemon.DaemonContext(
            files_preserve=[lock_fd] + ([listener.fileno()] if listener else []),
            working_directory="/", umask=0o022, signal_map={})
        context.open()
    (settings.state_dir / "agent.pid").write_text(f"{os.getpid()}\n")
    bound: Path | None = None
    server_pid, server_pipe = 0, -1
    warm()
    log = HookLog(verbose=foreground or verbose, context="agent")
    if serve:
        if listener is None:
            listener = server.bind_listener(settings.state_dir)
            bound = server.socket_path(settings.state_dir)
        server_pid, server_pipe = server.spawn(listener, settings.state_dir, entries(), [lock_fd], log)
        listener.close()
    return _loop(settings, foreground or verbose, log, server_pid, server_pipe, bound, watch)


def _loop(settings: settingsmod.Settings, verbose: bool, log: HookLog, server_pid: int,
          server_pipe: int, bound: Path | None, watch: bool) -> int:
    """The watch loop (or, with --no-watch, nothing but waiting) until SIGTERM, SIGINT
    or SIGHUP, or until the hook server dies: then the agent exits 1, for systemd to
    start it again, rather than leave hooks queued on a socket nobody accepts on."""
    from nichooks.ops.agent import Agent

    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    agent = Agent(settings, verbose=verbose) if watch else None
    stopping: list[str] = []  # why the loop ends, first reason first: "signal" or "server"

    def stop(_signum: int, _frame: object) -> None:
        stopping.append("signal")
        if agent is not None:
            agent.stopping = True

    def child(_signum: int, _frame: object) -> None:
        # The server has died only if it ends while nothing is stopping: once a stop
        # is under way it ends because of it (its pipe closes, or the same signal
        # reached it: a Ctrl-C goes to the whole process group).
        if server_pid and not stopping:
            try:
                done = os.waitpid(server_pid, os.WNOHANG)[0]
            except ChildProcessError:
                done = server_pid
            if done:
                stopping.append("server")
                if agent is not None:
                    agent.stopping = True

    signal.set_wakeup_fd(write_end)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    signal.signal(signal.SIGCHLD, child)
    child(signal.SIGCHLD, None)  # in case it died before the handler was there
    log.info("agent", result="started", pid=os.getpid(), state_dir=settings.state_dir,
             serving=bool(server_pid), watching=watch)
    try:
        if agent is not None:
            agent.run(wakeup=read_end)
        while not stopping:  # --no-watch: the wakeup pipe ends the wait, no race
            select.select([read_end], [], [])
            with contextlib.suppress(BlockingIOError):
                os.read(read_end, 512)
    finally:
        # Whether the server died is settled here, once: the handler goes (a SIGCHLD
        # still pending runs it first) before anything below can make the server end.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        died = stopping[:1] == ["server"]
        if died:
            log.error("agent", result="hook server died", action="exiting for a restart")
            server_pid = 0  # reaped
        log.info("agent", result="stopped")
        if agent is not None:
            agent.close()
        _stop_server(server_pid, server_pipe, bound)
        try:
            (settings.state_dir / "agent.pid").unlink()
        except FileNotFoundError:
            pass
    return EXIT_PLUMBING if died else EXIT_OK


def _stop_server(pid: int, pipe: int, bound: Path | None) -> None:
    """No new calls (the socket we made goes; systemd's stays, and queues callers for
    the next agent), then wait for the server to let the calls in flight finish. The
    server ends when its pipe closes: SIGCHLD must no longer be handled by then."""
    if bound is not None:
        try:
            bound.unlink()
        except FileNotFoundError:
            pass
    if pipe >= 0:
        os.close(pipe)
    if pid:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

