"""The agent's hook server: a process forked from the warm agent that only accepts
connections and forks one process per call (nichooks/serve/request.py).

It is a process of its own, not part of the agent's loop, so that a slow repair, a
sweep or an OVSDB audit never delays a hook: the loop here does nothing but accept,
fork and reap. Each call's process is forked from this one, which was forked after the
agent imported everything a hook needs, and before it opened its own netlink and
OVSDB connections (a child must never share those). It serves calls concurrently: each
call's process takes the NIC's lock files exactly as an in-process hook does.

The server ends when the agent does (its end of a pipe closes, even on SIGKILL), and
then waits up to DRAIN seconds for the calls in flight: an orderly stop does not cut
them (under systemd's KillMode=mixed, a crash of the agent does: docs/agent.md).
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from nichooks.errors import PlumbingError
from nichooks.host import netlink, routemirror
from nichooks.log import HookLog
from nichooks.serve.request import serve

SOCKET_NAME = "agent.sock"
BACKLOG = 128
MAX_CALLS = 64        # calls in flight; beyond that a caller runs in-process
DRAIN = 30.0          # seconds the server waits for calls in flight when it ends
REAP_EVERY = 0.5

Entries = Mapping[str, Callable[[Sequence[str]], int]]


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def inherited_listener(env: Mapping[str, str]) -> socket.socket | None:
    """The listening socket systemd passes (share/nichooks-agent.socket): fd 3 when
    LISTEN_PID is us and LISTEN_FDS >= 1."""
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS", "0").isdigit() \
            or int(env.get("LISTEN_FDS", "0")) < 1:
        return None
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise PlumbingError("the socket systemd passed (LISTEN_FDS) is not a Unix stream socket",
                            step="agent")
    sock.set_inheritable(False)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return sock


def bind_listener(state_dir: Path) -> socket.socket:
    """`<state dir>/agent.sock`, mode 0600 from the moment it exists (the state
    directory is root's alone: trust.py checks it). A stale socket of a dead agent is
    replaced; anything else at that path is left and refused."""
    path = socket_path(state_dir)
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise PlumbingError(f"{path} exists and is not a socket: not serving hooks",
                                step="agent")
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    # Bound through the directory's descriptor: a socket path has a 107-byte limit
    # that a deep state directory would pass (the hooks connect the same way).
    dirfd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.bind(f"/proc/self/fd/{dirfd}/{SOCKET_NAME}")
    finally:
        os.umask(old)
        os.close(dirfd)
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    return sock


def spawn(listener: socket.socket, state_dir: Path, entries: Entries,
          close_in_child: Sequence[int], log: HookLog) -> tuple[int, int]:
    """Fork the server; (its pid, the pipe end whose closing stops it)."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(read_end)
        os.set_inheritable(write_end, False)
        return pid, write_end
    status = 1
    try:
        os.close(write_end)
        for fd in close_in_child:
            os.close(fd)
        Server(listener, state_dir, entries, read_end, log).run()
        status = 0
    finally:
        os._exit(status)


def start_mirror(log: HookLog) -> routemirror.RouteMirror | None:
    """The route copy every call's process inherits (host/routemirror.py)."""
    try:
        mirror: routemirror.RouteMirror | None = routemirror.RouteMirror()
    except Exception as exc:
        log.warning("serve", result="no route copy: routed plans dump their table",
                    cause=str(exc))
        mirror = None
    netlink.ROUTE_COPY = mirror
    return mirror


class Server:
    def __init__(self, listener: socket.socket, state_dir: Path, entries: Entries,
                 agent_pipe: int, log: HookLog) -> None:
        self.listener, self.state_dir, self.entries, self.log = listener, state_dir, entries, log
        self.agent_pipe = agent_pipe
        self.calls: set[int] = set()
        self.stopping = False
        self.mirror: routemirror.RouteMirror | None = None

    def run(self) -> None:
        def stop(_signum: int, _frame: object) -> None:
            self.stopping = True

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, stop)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Every object so far is left out of garbage collection from here on: a
        # collection in a call's process would touch (and so copy) every page of the
        # warm heap it shares with this one.
        self.mirror = start_mirror(self.log)
        gc.collect()
        gc.freeze()
        while not self.stopping:
            mirror = self.mirror
            watched = [self.listener.fileno(), self.agent_pipe] + ([mirror.fileno()] if mirror else [])
            try:
                ready = select.select(watched, [], [], REAP_EVERY)[0]
            except InterruptedError:
                continue
            self.reap()
            if self.agent_pipe in ready:
                break  # the agent has ended
            if mirror and mirror.fileno() in ready:
                self.drain_mirror()
            if self.listener.fileno() in ready:
                self.accept()
        self.listener.close()
        end = time.monotonic() + DRAIN
        while self.calls and time.monotonic() < end:
            time.sleep(0.05)
            self.reap()

    def accept(self) -> None:
        try:
            conn, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError:
            time.sleep(0.05)  # EMFILE and friends: let calls end before accepting more
            return
        if len(self.calls) >= MAX_CALLS:
            conn.close()      # the caller runs in-process
            return
        self.drain_mirror()   # the call starts from the routes as they are now
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            conn.close()
            return
        if pid == 0:
            try:
                self.listener.close()
                os.close(self.agent_pipe)
                serve(conn, self.state_dir, self.entries, self.log)
            finally:
                os._exit(1)
        conn.close()
        self.calls.add(pid)

    def drain_mirror(self) -> None:
        if self.mirror is None:
            return
        try:
            self.mirror.drain()
        except Exception as exc:  # a copy we cannot keep is a copy we do not use
            self.log.warning("serve", result="route copy dropped", cause=str(exc))
            self.mirror.close()
            self.mirror = netlink.ROUTE_COPY = None

    def reap(self) -> None:
        for pid in list(self.calls):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.calls.discard(pid)
