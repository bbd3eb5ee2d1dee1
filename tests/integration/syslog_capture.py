"""Run a hook with a /dev/log of the test's choosing: none at all, or a datagram
socket the test reads. Never the machine's own /dev/log.

The hook runs in a private mount namespace (`unshare --mount --propagation
private`) whose /dev is a fresh tmpfs holding only the device nodes a hook may open
(bind-mounted from the real /dev) and, when asked for, the test's socket
bind-mounted as /dev/log. `ip netns exec` then enters the test's network namespace;
it makes a mount namespace of its own, but as a copy of the private one, so the hook
sees the same /dev. A check run in the hook's own mount namespace, right before it
is exec'd, proves /dev/log is what the test asked for (exit 97 otherwise). Every
mount dies with the namespace when the hook exits: the machine's /dev is never
touched, whether or not it has a /dev/log.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import Netns

WRONG_DEV_LOG = 97
"""The wrapper's exit status when /dev/log, as the hook would see it, is not what
the test asked for."""

_WRAPPER = r"""
set -eu
stage=$1 sock=$2 ns=$3
shift 3
mount -t tmpfs -o mode=0755,nosuid,size=64k nichooks-test-dev "$stage"
for node in null zero full random urandom; do
    : > "$stage/$node"
    mount --bind "/dev/$node" "$stage/$node"
done
ln -s /proc/self/fd "$stage/fd"
ln -s /proc/self/fd/0 "$stage/stdin"
ln -s /proc/self/fd/1 "$stage/stdout"
ln -s /proc/self/fd/2 "$stage/stderr"
if [ -n "$sock" ]; then
    : > "$stage/log"
    mount --bind "$sock" "$stage/log"
fi
mount --move "$stage" /dev
exec ip netns exec "$ns" /bin/sh -c '
    if [ -n "$1" ]; then
        [ -S /dev/log ] || { echo "syslog_capture: /dev/log is not a socket" >&2; exit 97; }
    elif [ -e /dev/log ] || [ -L /dev/log ]; then
        echo "syslog_capture: /dev/log exists" >&2; exit 97
    fi
    shift
    exec "$@"' sh "$sock" "$@"
"""


def run_with_dev_log(ns: Netns, argv: list[str], env: dict[str, str], stage: Path,
                     dev_log: Path | None) -> subprocess.CompletedProcess[str]:
    """Run `argv` in `ns` with /dev/log absent (`dev_log` None) or bound to the
    socket at `dev_log`. `stage` is an empty directory the private /dev is built
    on before it is moved into place. The hook is exec'd all the way down (unshare,
    sh, ip netns exec, sh), so the returned status is the hook's own."""
    stage.mkdir(exist_ok=True)
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", _WRAPPER, "sh",
         str(stage), str(dev_log) if dev_log is not None else "", ns.name, *argv],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


_HEADER = re.compile(r"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d ([^\[\]:\s]+)\[(\d+)\]: (.*)",
                     re.DOTALL)


@dataclass(frozen=True)
class SyslogLine:
    """One datagram as libc's syslog() formats it: `<PRI>TIMESTAMP IDENT[PID]: TEXT`."""

    priority: int
    ident: str
    pid: int
    text: str

    @property
    def fields(self) -> dict[str, str]:
        """The `key=value` pairs of the text (values double-quoted when needed)."""
        pairs = (token.partition("=") for token in shlex.split(self.text))
        return {key: value for key, sep, value in pairs if sep}

    @classmethod
    def parse(cls, datagram: bytes) -> SyslogLine:
        text = datagram.decode("utf-8", "replace").rstrip("\n\0")
        match = _HEADER.fullmatch(text)
        assert match, f"not a syslog datagram: {datagram!r}"
        return cls(int(match[1]), match[2], int(match[3]), match[4])


class SyslogSocket:
    """A datagram socket bound at `path`, read by a thread from the start: a unix
    datagram queue holds only net.unix.max_dgram_qlen (10 by default) messages, and a
    full one would block the hook's syslog() call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self._got: list[bytes] = []
        self._arrived = threading.Condition()
        self._stop = threading.Event()
        self._marks = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            with self._arrived:
                self._got.append(data)
                self._arrived.notify_all()

    def take(self, timeout: float = 30.0) -> list[SyslogLine]:
        """Everything received since the last take(). Call it once the hook has
        exited: each of its syslog() calls had queued its datagram by then, so a marker
        sent now arrives after all of them (the queue is FIFO); wait for the marker."""
        self._marks += 1
        mark = b"syslog_capture mark %d" % self._marks
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendto(mark, str(self.path))
        with self._arrived:
            if not self._arrived.wait_for(lambda: mark in self._got, timeout):
                raise AssertionError(f"the marker sent to {self.path} never arrived")
            end = self._got.index(mark)
            got, self._got = self._got[:end], self._got[end + 1:]
        return [SyslogLine.parse(data) for data in got]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SyslogSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
