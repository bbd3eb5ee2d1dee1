"""The fast path of kvm-ifup, kvm-ifdown and vif-ganeti: hand the call to the warm
agent, or run it in this process exactly as before.

The hooks start with `python3 -S`, so only the interpreter's built-in modules are
here (sys, posix, time, _socket; not even `array`, which imports `collections`): no `site`
(13 ms with our virtualenv), no `socket`, no `nichooks`. The whole call is the
caller's argv, environment, working directory and stdin/stdout/stderr (passed as
descriptors, so the agent's process for this request prints exactly what a direct
run would, to the same pipes); what comes back is the exit status. docs/agent.md
describes the protocol and its guarantees.

Run in-process when there is no agent socket, the connection is refused, the agent
does not accept within ACCEPT_WAIT, or it refuses the request (another network
namespace, another state directory, a request it cannot read). Once the agent has
said it runs the request, never run it again here, unless the agent's process died
before it answered: then re-running is safe, because an ifup converges over a
half-applied plug and an ifdown undoes what is left.

This file must stay importable by a bare interpreter; tests/unit/test_fastpath.py
checks that its protocol constants match nichooks/serve/request.py.
"""

import _socket
import posix
import sys
import time

MAGIC = b"NICHOOKS1\n"
SOCKET_NAME = b"agent.sock"
DEFAULT_STATE_DIR = b"/run/nichooks"
DEFAULT_CONF_DIR = b"/etc/nichooks"
STATE_DIR_KEY = b"nichooks_state_dir"
ACCEPTED, REFUSED, GO = b"A", b"R", b"G"
ACCEPT_WAIT = 1.0     # seconds, in all, for the agent to take the call before we run it here
MAX_CONF = 1 << 20
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL


def state_dir(env: dict) -> bytes:
    """NICHOOKS_STATE_DIR as settings.load finds it: the environment, then the settings
    file, then the default. Only a hint: the agent refuses a request whose settings
    name another state directory than its own."""
    value = env.get(b"NICHOOKS_STATE_DIR")
    if value:
        return value
    conf = (env.get(b"NICHOOKS_CONF_DIR") or DEFAULT_CONF_DIR) + b"/nichooks.conf"
    try:  # as settings.py opens it: never blocking on a FIFO, a regular file only
        fd = posix.open(conf, posix.O_RDONLY | posix.O_NONBLOCK | posix.O_CLOEXEC)
    except OSError:
        return DEFAULT_STATE_DIR
    try:
        if posix.fstat(fd).st_mode & 0o170000 != 0o100000:
            return DEFAULT_STATE_DIR
        text = posix.read(fd, MAX_CONF)
    except OSError:
        return DEFAULT_STATE_DIR
    finally:
        posix.close(fd)
    for line in text.splitlines():
        cut = min((i for i in (line.find(b"="), line.find(b":")) if i >= 0), default=-1)
        if cut > 0 and line[:cut].strip().lower() == STATE_DIR_KEY and line[cut + 1:].strip():
            return line[cut + 1:].strip()
    return DEFAULT_STATE_DIR


def request(entry: str, argv: list, env: dict) -> bytes:
    """MAGIC, a 4-byte big-endian length, then NUL-separated fields: the entry, the
    network namespace (st_dev:st_ino), the working directory, the umask (octal), argc,
    argv, KEY=VALUE."""
    netns = posix.stat("/proc/self/ns/net")
    mask = posix.umask(0o022)
    posix.umask(mask)
    fields = [entry.encode(), b"%d:%d" % (netns.st_dev, netns.st_ino), posix.getcwdb(),
              b"%o" % mask, b"%d" % len(argv)]
    fields += [arg.encode("utf-8", "surrogateescape") for arg in argv]
    fields += [key + b"=" + value for key, value in env.items()]
    payload = b"\0".join(fields)
    return MAGIC + len(payload).to_bytes(4, "big") + payload


def by_agent(entry: str) -> "int | None":
    """The exit status the agent's run of this call ended with, or None: run it here."""
    env = posix.environ
    directory = state_dir(env)
    path = directory.rstrip(b"/") + b"/" + SOCKET_NAME
    try:
        data = request(entry, sys.argv, env)
        if len(path) > MAX_SOCKET_PATH:  # through the directory's descriptor
            dirfd = posix.open(directory, posix.O_PATH | posix.O_DIRECTORY | posix.O_CLOEXEC)
            path = b"/proc/self/fd/%d/%s" % (dirfd, SOCKET_NAME)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except (OSError, ValueError):
        return None
    try:
        try:
            deadline = time.monotonic() + ACCEPT_WAIT
            sock.settimeout(ACCEPT_WAIT)
            sock.connect(path)
            sock.sendall(data)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if sock.recv(1) != ACCEPTED:
                return None
            # Our stdio goes with the go, only once the agent has taken the call: a
            # request left queued must not hold the caller's pipes open after we exit.
            fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))  # 3 C ints
            sock.sendmsg([GO], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        except OSError:  # no agent, refused, too slow (socket.timeout is an OSError)
            return None
        # From here the request is the agent's: wait for it as long as it takes.
        sock.settimeout(None)
        try:
            status = sock.recv(1)
        except OSError:
            status = b""
        return status[0] if status else None   # None: it died before answering
    finally:
        sock.close()


def in_process(entry: str) -> int:
    import site

    site.main()  # the virtualenv's packages (and any sitecustomize), as without -S
    from nichooks import entry as entries

    return getattr(entries, entry)(sys.argv)


def run(entry: str) -> int:
    status = by_agent(entry)
    return in_process(entry) if status is None else status
