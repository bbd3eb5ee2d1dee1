"""Hooks served by the agent (bin/nichooks_fastpath.py, nichooks/serve/), on the real
kernel: who ran the call is read from the parent of a custom script the call runs
(the hook's own process when in-process, the agent's server when served)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.agent_env import AgentProc
from tests.integration.bridged_env import Site
from tests.support.hooks import bin_path, hook_env, one_line, wait_for
from tests.support.netns import Netns
from tests.support.procs import children
from tests.support.scripts import write_script
from tests.support.state import names_in

MAGIC = b"NICHOOKS1\n"


def served_agent(site: Site, tmp: Path) -> AgentProc:
    return AgentProc(site.host, site.env(), tmp / "agent.log")


def start_hook(ns: Netns, hook: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """A hook run in `ns` as Ganeti runs it, left running: its pid, output and status
    are the test's to read."""
    return subprocess.Popen(["ip", "netns", "exec", ns.name, bin_path(hook), *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def record_parent(site: Site, action: str = "up") -> Path:
    """An if<action>.d script that writes its parent's pid and its own environment's
    SERVED_PROBE."""
    out = site.state.parent / f"custom-{action}.txt"
    write_script(site.conf / f"if{action}.d", "10-probe",
                 f'echo "$PPID ${{SERVED_PROBE:-unset}}" >> {out}')
    return out


def parent_of_call(out: Path) -> int:
    return int(out.read_text().splitlines()[-1].split()[0])


def wait_socket(site: Site) -> Path:
    sock = site.state / "agent.sock"
    wait_for("the agent's socket", sock.exists, timeout=15)
    return sock


@contextmanager
def running(agent: AgentProc) -> Iterator[AgentProc]:
    agent.start()
    try:
        yield agent
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- agent log ---\n{agent.log()}") from None
    finally:
        agent.stop()


def test_served_call_is_the_direct_call(site: Site, tmp_path: Path) -> None:
    """Served: same status, same stdout and stderr, the caller's environment reaches
    the custom scripts, and the work is done by the agent's process, not the hook's."""
    site.add_bridge("br0")
    site.add_tap()
    out = record_parent(site)
    env = {**site.env(), "SERVED_PROBE": "from-the-caller"}
    direct = site.hook("kvm-ifup", "-v", "tap0", env=env)
    assert direct.returncode == 0, direct.stderr
    in_process_parent = parent_of_call(out)
    assert site.hook("kvm-ifdown", "tap0", env=env).returncode == 0
    with running(served_agent(site, tmp_path)) as agent:
        wait_socket(site)
        assert agent.proc is not None
        proc = start_hook(site.host, "kvm-ifup", "-v", "tap0", env=env)
        stdout, stderr = proc.communicate(timeout=60)
        assert (proc.returncode, stdout, stderr) == (0, direct.stdout, direct.stderr)
        assert "event=ifup result=ok" in stderr
        parent, probe = out.read_text().splitlines()[-1].split()
        assert probe == "from-the-caller"
        assert int(parent) != proc.pid
        assert in_process_parent != int(parent)
        assert site.host.link("tap0").get("master") == "br0"
        assert "result=serving" in agent.log()
        # A failing call: the same one line and exit 2, from the agent's process.
        bad = {**env, "MAC": "zz:zz"}
        served_bad = site.hook("kvm-ifup", "tap0", env=bad)
        assert "result=refused" not in agent.log()
        assert site.hook("kvm-ifdown", "tap0", env=env).returncode == 0
    direct_bad = site.hook("kvm-ifup", "tap0", env=bad)
    assert (served_bad.returncode, served_bad.stdout, served_bad.stderr) == \
        (direct_bad.returncode, direct_bad.stdout, direct_bad.stderr)
    assert served_bad.returncode == 2
    one_line(served_bad.stderr)


def test_other_namespace_runs_in_process(site: Site, tmp_path: Path) -> None:
    """An agent in another namespace with the same state directory refuses the call;
    the hook runs it itself, in its own namespace."""
    site.add_bridge("br0")
    site.add_tap()
    out = record_parent(site)
    elsewhere = Netns()
    try:
        agent = AgentProc(elsewhere, site.env(), tmp_path / "agent.log")
        with running(agent):
            wait_socket(site)
            proc = start_hook(site.host, "kvm-ifup", "tap0", env=site.env())
            _stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
            assert parent_of_call(out) == proc.pid  # ran in the hook's own process
            assert site.host.link("tap0").get("master") == "br0"
            assert "another network namespace" in agent.log()
            assert site.hook("kvm-ifdown", "tap0").returncode == 0
    finally:
        elsewhere.delete()


def _raw(sock_path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(str(sock_path))
    return conn


def _answer(conn: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _request(payload: bytes, length: int | None = None) -> bytes:
    return MAGIC + struct.pack(">I", len(payload) if length is None else length) + payload


@pytest.mark.parametrize("data, with_fds, cause", [
    (b"GET / HTTP/1.0\r\n\r\n", True, "not a nichooks request"),
    (_request(b"x" * 10, length=64 * 1024 * 1024), True, "request too large"),
    (_request(b"kvm_ifup\x001:2\x00/\x0022\x001\x00kvm-ifup"), False, "another network namespace"),
    (_request(b"rm_rf\x001:2\x00/\x0022\x001\x00x"), True, "unknown entry point"),
    (_request(b"kvm_ifup\x00;id\x00/\x0022\x001\x00kvm-ifup"), True, "malformed network namespace"),
    (_request(b"kvm_ifup\x001:2\x00/\x0022\x009\x00kvm-ifup"), True, "malformed argv"),
    (_request(b"kvm_ifup\x001:2\x00/\x009\x001\x00kvm-ifup"), True, "malformed umask"),
    (_request(b"kvm_ifup\x001:2\x00/\x0022\x001\x00kvm-ifup\x00NOEQUALS"), True, "malformed environment"),
    (_request(b"kvm_ifup\x001:2\x00/\x0022\x001\x00kvm-ifup\x00A=1"), True, "another network namespace"),
])
def test_bad_requests_are_refused(site: Site, tmp_path: Path, data: bytes, with_fds: bool,
                                  cause: str) -> None:
    """Each is refused with `R` and a reason, changes nothing, and the agent serves the
    next honest call."""
    site.add_bridge("br0")
    site.add_tap()
    out = record_parent(site)
    with running(served_agent(site, tmp_path)) as agent:
        sock = wait_socket(site)
        before = site.host.snapshot()
        conn = _raw(sock)
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))] if with_fds else []
        conn.sendmsg([data], fds)
        answer = _answer(conn)
        conn.close()
        assert answer.startswith(b"R"), answer
        assert cause.encode() in answer, answer
        assert site.host.snapshot() == before
        assert names_in(site.state, "nics") == []
        proc = start_hook(site.host, "kvm-ifup", "tap0", env=site.env())
        assert proc.wait(timeout=60) == 0
        assert parent_of_call(out) != proc.pid  # served
        assert agent.alive()
        assert site.hook("kvm-ifdown", "tap0").returncode == 0


NO_STDIO_GO = r"""
import os, socket, struct, sys
path, env = sys.argv[1], sys.argv[2:]
mine = os.stat("/proc/self/ns/net")
body = b"\0".join([b"kvm_ifup", b"%d:%d" % (mine.st_dev, mine.st_ino), b"/", b"22", b"2",
                   b"kvm-ifup", b"tap0", *(e.encode() for e in env)])
for fds in ([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", 0, 1))]):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(path)
    conn.sendall(b"NICHOOKS1\n" + struct.pack(">I", len(body)) + body)
    answer = conn.recv(1)
    if answer == b"A":
        conn.sendmsg([b"G"], fds)
        rest = conn.recv(16)
        print("accepted", "answered" if rest else "closed")
    else:
        print("refused", answer)
    conn.close()
"""


def test_a_go_without_the_callers_stdio_is_not_run(site: Site, tmp_path: Path) -> None:
    """A well-formed request from the agent's namespace is accepted; a `G` without
    exactly three descriptors ends the call's process without running anything."""
    site.add_bridge("br0")
    site.add_tap()
    out = record_parent(site)
    with running(served_agent(site, tmp_path)) as agent:
        sock = wait_socket(site)
        before = site.host.snapshot()
        env = [f"{k}={v}" for k, v in site.env().items()]
        run = site.host.run(sys.executable, "-c", NO_STDIO_GO, str(sock), *env, check=False)
        assert run.stdout.split("\n")[:2] == ["accepted closed", "accepted closed"], run
        assert site.host.snapshot() == before
        assert names_in(site.state, "nics") == []
        assert not out.exists()
        assert agent.alive()


def test_half_sent_request_holds_up_nobody(site: Site, tmp_path: Path) -> None:
    """A client that sends half a request and waits ties up only its own process:
    other calls are served meanwhile, and it is dropped after the read timeout."""
    site.add_bridge("br0")
    site.add_tap()
    out = record_parent(site)
    with running(served_agent(site, tmp_path)) as agent:
        sock = wait_socket(site)
        stalled = _raw(sock)
        stalled.sendmsg([_request(b"kvm_ifup\x00", length=1000)],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))])
        proc = start_hook(site.host, "kvm-ifup", "tap0", env=site.env())
        assert proc.wait(timeout=60) == 0
        assert parent_of_call(out) != proc.pid
        assert _answer(stalled).startswith(b"R")  # after the read timeout
        stalled.close()
        assert agent.alive()
        assert site.hook("kvm-ifdown", "tap0").returncode == 0


def test_non_root_peer_is_refused(netns: Netns) -> None:
    """The socket is 0600 (a non-root caller cannot connect); were it opened to all,
    SO_PEERCRED still refuses any uid but 0. (The state directory is made traversable
    by all for this test only, so that the socket's own mode is what is tested.)"""
    top = Path(tempfile.mkdtemp(prefix="nht-served-", dir="/tmp"))
    try:
        state, conf = top / "state", top / "conf"
        state.mkdir(mode=0o711)
        conf.mkdir()
        top.chmod(0o711)
        state.chmod(0o711)
        with running(AgentProc(netns, hook_env(state, conf), top / "agent.log")) as agent:
            sock = state / "agent.sock"
            wait_for("the agent's socket", sock.exists, timeout=15)
            assert sock.stat().st_mode & 0o777 == 0o600
            probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
                     "try:\n  s.connect(sys.argv[1])\nexcept PermissionError:\n  print('EACCES')\n"
                     "  raise SystemExit\ns.sendall(b'x')\nprint(s.recv(200).decode())\n")
            nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            first = subprocess.run([*nobody, "/usr/bin/python3", "-c", probe, str(sock)],
                                   capture_output=True, text=True, timeout=30)
            assert first.stdout.strip() == "EACCES", first
            sock.chmod(0o666)
            second = subprocess.run([*nobody, "/usr/bin/python3", "-c", probe, str(sock)],
                                    capture_output=True, text=True, timeout=30)
            assert second.stdout.startswith("Rpeer uid 65534 is not root"), second
            assert agent.alive()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_agent_killed_mid_call(site: Site, tmp_path: Path) -> None:
    """SIGKILL of the agent and everything it forked while a served ifup is in its
    custom script: the hook runs the call itself (the agent died before answering),
    completes, and ifdown + sweep leave the namespace as it was."""
    site.add_bridge("br0")
    site.add_tap()
    gate = site.state.parent / "gate"
    out = site.state.parent / "custom-up.txt"
    write_script(site.conf / "ifup.d", "10-wait",
                 f'echo "$PPID" >> {out}\n'
                 f'while [ ! -e {gate} ] && [ "$(wc -l < {out})" -lt 2 ]; do sleep 0.05; done')
    before = site.host.snapshot()
    agent = served_agent(site, tmp_path)
    agent.start()
    try:
        wait_socket(site)
        proc = start_hook(site.host, "kvm-ifup", "tap0", env=site.env())
        wait_for("the served call to reach its custom script", out.exists, timeout=30)
        assert agent.proc is not None
        _kill_tree(agent.proc.pid)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        agent.stop()
    parents = [int(line) for line in out.read_text().split()]
    assert proc.returncode == 0, stderr
    assert len(parents) == 2 and parents[1] == proc.pid  # re-run by the hook itself
    assert site.host.link("tap0").get("master") == "br0"
    assert site.hook("kvm-ifdown", "tap0").returncode == 0
    assert site.host.run(bin_path("nichooks"), "sweep", env=site.env()).returncode == 0
    assert names_in(site.state, "nics") == []
    assert site.host.snapshot() == before


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it, children first."""
    for child in children(pid):
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_agent_killed_alone_lets_the_call_finish(site: Site, tmp_path: Path) -> None:
    """SIGKILL of the agent's main process only: the call's own process carries on and
    answers; the hook exits 0 without running the call a second time."""
    site.add_bridge("br0")
    site.add_tap()
    gate = site.state.parent / "gate"
    out = site.state.parent / "custom-up.txt"
    write_script(site.conf / "ifup.d", "10-wait",
                 f'echo "$PPID" >> {out}\nwhile [ ! -e {gate} ]; do sleep 0.05; done')
    agent = served_agent(site, tmp_path)
    agent.start()
    try:
        wait_socket(site)
        proc = start_hook(site.host, "kvm-ifup", "tap0", env=site.env())
        wait_for("the served call to reach its custom script", out.exists, timeout=30)
        assert agent.proc is not None
        os.kill(agent.proc.pid, signal.SIGKILL)
        time.sleep(0.3)
        gate.touch()
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        agent.stop()
    assert proc.returncode == 0, stderr
    assert len(out.read_text().split()) == 1  # ran once
    assert site.host.link("tap0").get("master") == "br0"
    assert site.hook("kvm-ifdown", "tap0").returncode == 0


def test_agent_restarted_under_load(site: Site, tmp_path: Path) -> None:
    """32 ifups in flight while the agent restarts, then 32 ifdowns while it restarts
    again: every call exits 0 (served, or run by the hook when no agent listened) and
    every NIC ends where its last call put it."""
    site.add_bridge("br0")
    count = 32
    for n in range(count):
        site.host.ip("link", "add", f"tap{n}", "type", "veth", "peer", "name", f"peer{n}")
    uuids = [str(uuid.uuid4()) for _ in range(count)]

    def env(n: int) -> dict[str, str]:
        return site.env(INTERFACE=f"tap{n}", INTERFACE_UUID=uuids[n],
                        MAC=f"aa:00:00:00:01:{n:02x}")

    def burst(hook: str) -> list[subprocess.Popen[str]]:
        return [start_hook(site.host, hook, f"tap{n}", env=env(n)) for n in range(count)]

    for hook in ("kvm-ifup", "kvm-ifdown"):
        first = served_agent(site, tmp_path)
        first.start()
        wait_socket(site)
        procs = burst(hook)
        time.sleep(0.2)
        first.stop()
        second = served_agent(site, tmp_path)
        second.start()
        try:
            results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
        finally:
            second.stop()
        assert [r for r in results if r[0] != 0] == [], first.log() + second.log()
        masters = {n: site.host.link(f"tap{n}").get("master") for n in range(count)}
        want = "br0" if hook == "kvm-ifup" else None
        assert masters == dict.fromkeys(range(count), want)
        assert len(names_in(site.state, "nics")) == (count if hook == "kvm-ifup" else 0)


ACTIVATE = ("import os, sys\n"
            "fd = int(sys.argv[1])\n"
            "os.dup2(fd, 3)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
            "os.execvp(sys.argv[2], sys.argv[2:])\n")


def test_socket_activation(site: Site, tmp_path: Path) -> None:
    """The agent serves on the listening socket systemd passes (LISTEN_FDS, fd 3), and
    leaves it in place when it stops: systemd owns it."""
    site.add_bridge("br0")
    site.add_tap()
    out = record_parent(site)
    sock_path = site.state / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    sock_path.chmod(0o600)
    listener.listen(16)
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(listener.fileno()), "ip", "netns", "exec",
         site.host.name, bin_path("nichooks"), "agent", "--foreground"],
        env=site.env(), pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL, stdout=log,
        stderr=log)
    try:
        wait_for("the agent to start", lambda: "result=started" in
                 (tmp_path / "agent.log").read_text(), timeout=20)
        proc = start_hook(site.host, "kvm-ifup", "tap0", env=site.env())
        assert proc.wait(timeout=60) == 0
        assert parent_of_call(out) != proc.pid  # served
        assert site.host.link("tap0").get("master") == "br0"
    finally:
        agent.terminate()
        agent.wait(timeout=60)
        log.close()
    assert sock_path.exists(), "the agent removed the socket systemd owns"
    listener.close()
    assert site.hook("kvm-ifdown", "tap0").returncode == 0


def test_hostile_bytes_on_the_socket(site: Site, tmp_path: Path) -> None:
    """Random requests, derandomized (hypothesis): raw bytes, a valid header with a
    random body, with and without descriptors. Each is answered `R` (or dropped), the
    namespace and the state directory stay as they were, and the agent then serves an
    honest call."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    site.add_bridge("br0")
    site.add_tap()
    out = record_parent(site)
    with running(served_agent(site, tmp_path)) as agent:
        sock = wait_socket(site)
        before = site.host.snapshot()
        answers: list[bytes] = []

        @settings(max_examples=40, derandomize=True, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=st.one_of(st.binary(max_size=200),
                              st.lists(st.binary(max_size=30), max_size=10).map(b"\0".join)),
               framed=st.booleans(), with_fds=st.booleans())
        def probe(body: bytes, framed: bool, with_fds: bool) -> None:
            conn = _raw(sock)
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))] \
                if with_fds else []
            conn.sendmsg([_request(body) if framed else body or b"x"], fds)
            if not framed:
                conn.shutdown(socket.SHUT_WR)  # a short unframed body must not wait 2 s
            answer = _answer(conn)
            conn.close()
            assert answer == b"" or answer.startswith(b"R"), answer
            answers.append(answer)

        probe()
        assert site.host.snapshot() == before
        assert names_in(site.state, "nics") == []
        assert agent.alive()
        proc = start_hook(site.host, "kvm-ifup", "tap0", env=site.env())
        assert proc.wait(timeout=60) == 0
        assert parent_of_call(out) != proc.pid
        assert site.hook("kvm-ifdown", "tap0").returncode == 0
        refused = sum(a.startswith(b"R") for a in answers)
        print(f"hostile requests: {len(answers)}, refused with a reason: {refused}")


def test_agent_exits_when_its_hook_server_dies(site: Site, tmp_path: Path) -> None:
    """Nobody would accept on the socket any more: the agent says so and exits 1, for
    systemd to start it again; the hooks meanwhile run in-process."""
    agent = served_agent(site, tmp_path)
    agent.start()
    try:
        wait_socket(site)
        assert agent.proc is not None
        server = children(agent.proc.pid)
        assert len(server) == 1, server
        os.kill(server[0], signal.SIGKILL)
        assert agent.proc.wait(timeout=30) == 1
    finally:
        agent.stop()
    assert "hook server died" in agent.log()
