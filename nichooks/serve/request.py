"""One hook call served by the agent, in a process forked for it alone.

The fork of the warm agent has pyroute2, the OVS IDL and every mode imported already:
what costs a hook 200 ms cold is done. Everything the peer sends is hostile until
checked: the peer must be root in the agent's own network namespace, the request must
be well formed and within bounds, and its settings must name the agent's state
directory. A refusal costs the caller nothing but its in-process run; a request that
is malformed, oversized or half-sent ends this process only, never the agent or
another caller's request.

The protocol (bin/nichooks_fastpath.py is the client; docs/agent.md):
  client: MAGIC, a 4-byte big-endian length, NUL-separated fields (entry, network
          namespace, cwd, umask, argc, argv, KEY=VALUE...)
  agent:  `A` (accepted) or `R` + a reason (then it closes)
  client: `G` (go: it has not given up waiting; the call is ours from now on), with
          its fds 0, 1, 2 attached (SCM_RIGHTS): never sent with a request that may
          sit in a queue, where they would hold the caller's pipes open
  agent:  one byte, the exit status, when the call is done
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from nichooks.log import HookLog

MAGIC = b"NICHOOKS1\n"
ACCEPTED, REFUSED, GO = b"A", b"R", b"G"
HEADER = len(MAGIC) + 4
MAX_REQUEST = 256 * 1024   # a Ganeti environment is ~4 KiB
MAX_ARGS = 16
MAX_ENV = 1024
READ_TIMEOUT = 2.0         # seconds for a request (and the go) to arrive in full
ENTRIES = ("kvm_ifup", "kvm_ifdown", "vif_ganeti")


class Refused(Exception):
    """The request is not served; the client runs it in-process."""


@dataclass(frozen=True)
class Request:
    entry: str
    peer: int
    netns: tuple[int, int]
    cwd: bytes
    umask: int
    argv: list[str]
    env: dict[bytes, bytes]


def netns_of(pid: int | str) -> tuple[int, int]:
    info = os.stat(f"/proc/{pid}/ns/net")
    return info.st_dev, info.st_ino


def parse(payload: bytes, peer: int = 0) -> Request:
    """The fields after the header, each checked; Refused names what is wrong."""
    fields = payload.split(b"\0")
    if len(fields) < 5:
        raise Refused("too few fields")
    entry, netns, cwd, umask, argc = fields[:5]
    if entry.decode("ascii", "replace") not in ENTRIES:
        raise Refused("unknown entry point")
    dev, sep, ino = netns.partition(b":")
    if not (sep and dev.isdigit() and ino.isdigit() and len(netns) <= 41):
        raise Refused("malformed network namespace")
    if not cwd.startswith(b"/"):
        raise Refused("working directory not absolute")
    if not (umask and len(umask) <= 4 and set(umask) <= set(b"01234567")) or int(umask, 8) > 0o777:
        raise Refused("malformed umask")
    if not argc.isdigit() or not 1 <= int(argc) <= MAX_ARGS or 5 + int(argc) > len(fields):
        raise Refused("malformed argv")
    argv = [os.fsdecode(arg) for arg in fields[5:5 + int(argc)]]
    env: dict[bytes, bytes] = {}
    items = fields[5 + int(argc):]
    if len(items) > MAX_ENV:
        raise Refused("too many environment variables")
    for item in items:
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise Refused("malformed environment variable")
        env[key] = value
    return Request(entry.decode("ascii"), peer, (int(dev), int(ino)), cwd, int(umask, 8), argv,
                   env)


def receive(conn: socket.socket) -> bytes:
    """The request's payload, read in full within READ_TIMEOUT seconds in all."""
    data = b""
    want = HEADER
    deadline = time.monotonic() + READ_TIMEOUT
    while len(data) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused(f"request not sent in full within {READ_TIMEOUT:g} s")
        conn.settimeout(left)
        try:
            chunk = conn.recv(min(want - len(data), 65536))
        except TimeoutError:
            raise Refused(f"request not sent in full within {READ_TIMEOUT:g} s") from None
        if not chunk:
            raise Refused("request cut short")
        data += chunk
        if want == HEADER and len(data) >= HEADER:
            if not data.startswith(MAGIC):
                raise Refused("not a nichooks request")
            length = struct.unpack(">I", data[len(MAGIC):HEADER])[0]
            if length > MAX_REQUEST:
                raise Refused("request too large")
            want = HEADER + length
    return data[HEADER:]


def go(conn: socket.socket) -> list[int] | None:
    """The caller's `G` and, with it, its stdin, stdout and stderr; None when it gave up
    waiting (or sent anything else): the call is then not run."""
    space = socket.CMSG_SPACE(3 * array.array("i").itemsize)
    data, ancdata, _flags, _addr = conn.recvmsg(1, space, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(blob[:len(blob) - len(blob) % got.itemsize])
            fds.extend(got)
    if data != GO or len(fds) != 3:
        _close(fds)
        return None
    return fds


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def admit(conn: socket.socket, state_dir: Path) -> Request:
    """Read and check one request; Refused when it is not ours to run."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    if uid != 0:
        raise Refused(f"peer uid {uid} is not root")
    req = parse(receive(conn), pid)
    try:
        mine = netns_of("self")
        theirs = netns_of(pid)
    except OSError as exc:
        raise Refused(f"cannot tell the caller's network namespace: {exc}") from None
    if req.netns != mine or theirs != mine:
        raise Refused("caller is in another network namespace")
    if _state_dir(req.env) != state_dir:
        raise Refused("caller's settings name another state directory, or are invalid")
    return req


def _state_dir(env: Mapping[bytes, bytes]) -> Path | None:
    """The state directory this caller's settings name; None when they are invalid
    (refused: the hook's own run says what is wrong, as it always has)."""
    from nichooks import settings as settingsmod
    from nichooks.errors import NicHooksError

    try:
        return settingsmod.load({os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}).state_dir
    except (NicHooksError, OSError, ValueError):
        return None


def refuse(conn: socket.socket, why: str) -> None:
    """`R` and the reason; then whatever the peer still sends is read and dropped for
    a moment, so that it reads our answer rather than a connection reset."""
    conn.sendall(REFUSED + why.encode()[:200])
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(0.2)
    try:
        for _ in range(64):
            if not conn.recv(65536):
                break
    except OSError:
        pass


def serve(conn: socket.socket, state_dir: Path,
          entries: Mapping[str, Callable[[Sequence[str]], int]], log: HookLog) -> NoReturn:
    """The forked process's whole life: admit, run as the caller, answer, exit."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    try:
        try:
            req = admit(conn, state_dir)
        except Refused as exc:
            log.warning("serve", result="refused", cause=str(exc))
            refuse(conn, str(exc))
            os._exit(0)
        conn.sendall(ACCEPTED)
        conn.settimeout(READ_TIMEOUT)
        fds = go(conn)
        if fds is None:  # the caller gave up waiting and runs the call itself
            log.warning("serve", result="caller gave up waiting", entry=req.entry, peer=req.peer)
            os._exit(0)
        conn.settimeout(None)
    except OSError:
        os._exit(0)
    if log.verbose:
        log.info("serve", result="serving", entry=req.entry, peer=req.peer)
    status = run_as_caller(req, fds, entries)
    try:
        conn.sendall(bytes([status & 0xFF]))
    finally:
        os._exit(0)


def run_as_caller(req: Request, fds: list[int],
                  entries: Mapping[str, Callable[[Sequence[str]], int]]) -> int:
    """Become the caller's process as far as the entry point can tell: its stdio, its
    environment (custom scripts get it whole), umask, working directory and argv."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    _close([fd for fd in fds if fd > 2])
    os.environb.clear()
    os.environb.update(req.env)
    os.umask(req.umask)
    from nichooks.host.closing import defer_closes

    defer_closes()  # this process ends once it has answered: its exit closes them
    try:
        os.chdir(req.cwd)
    except OSError:
        os.chdir("/")
    sys.argv = list(req.argv)
    try:
        status = entries[req.entry](req.argv)
    except SystemExit as exc:
        status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # the entry points catch their own; this is a bug
        status = 1
        try:
            print(f"nichooks: internal error in the agent's run of {req.entry}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
        except (OSError, ValueError):
            pass  # a broken stderr must not keep the status from the caller
    # Flush and close the caller's pipes before answering: its output ends when it
    # learns the status, as for a direct run.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    _close([0, 1, 2])
    return status
