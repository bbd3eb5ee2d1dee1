"""The hooks' fast path (bin/nichooks_fastpath.py) and the agent's request parser
(nichooks/serve/request.py): one protocol, built-in modules only on the client, and a
parser that answers any bytes with a request or a refusal."""

from __future__ import annotations

import importlib.util
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nichooks.serve import request as server_side

BIN = Path(__file__).resolve().parents[2] / "bin"
COMMON = {"derandomize": True, "deadline": None, "suppress_health_check": list(HealthCheck)}


def client() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nichooks_fastpath", BIN / "nichooks_fastpath.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_protocol() -> None:
    c = client()
    assert (c.MAGIC, c.ACCEPTED, c.REFUSED, c.GO) == \
        (server_side.MAGIC, server_side.ACCEPTED, server_side.REFUSED, server_side.GO)
    from nichooks.serve.server import SOCKET_NAME
    assert c.SOCKET_NAME.decode() == SOCKET_NAME


arg = st.binary(max_size=40).filter(lambda b: b"\0" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape"))
key = st.binary(min_size=1, max_size=12).filter(lambda b: b"\0" not in b and b"=" not in b)
value = st.binary(max_size=40).filter(lambda b: b"\0" not in b)


@settings(max_examples=300, **COMMON)
@given(entry=st.sampled_from(server_side.ENTRIES), argv=st.lists(arg, min_size=1, max_size=8),
       env=st.dictionaries(key, value, max_size=20))
def test_what_the_client_sends_the_agent_reads(entry: str, argv: list[str],
                                               env: dict[bytes, bytes]) -> None:
    data = client().request(entry, argv, env)
    length = struct.unpack(">I", data[len(server_side.MAGIC):server_side.HEADER])[0]
    assert len(data) == server_side.HEADER + length
    req = server_side.parse(data[server_side.HEADER:], peer=42)
    mask = os.umask(0o022)
    os.umask(mask)
    assert (req.entry, req.argv, req.env, req.cwd, req.peer, req.umask) == \
        (entry, argv, env, os.getcwdb(), 42, mask)
    mine = os.stat("/proc/self/ns/net")
    assert req.netns == (mine.st_dev, mine.st_ino)


@settings(max_examples=1000, **COMMON)
@given(payload=st.one_of(st.binary(max_size=300),
                         st.lists(st.binary(max_size=20), max_size=12).map(b"\0".join)))
def test_any_bytes_are_a_request_or_a_refusal(payload: bytes) -> None:
    try:
        req = server_side.parse(payload)
    except server_side.Refused:
        return
    assert req.entry in server_side.ENTRIES and req.argv and req.cwd.startswith(b"/")


def test_the_fast_path_imports_only_built_in_modules(tmp_path: Path) -> None:
    """The hook as Ganeti runs it, against a stand-in agent that accepts and answers
    status 7: no `site`, `socket` or `nichooks`, only modules built into the
    interpreter, and the status is the hook's."""
    state = tmp_path / "state"
    state.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(state / "agent.sock"))
    listener.listen(1)
    got: dict[str, object] = {}

    def agent() -> None:
        conn, _ = listener.accept()
        data, early, _flags, _addr = conn.recvmsg(1 << 16, socket.CMSG_SPACE(12))
        got["data"], got["early"] = data, early  # no descriptors before the go
        conn.sendall(b"A")
        go, ancdata, _flags, _addr = conn.recvmsg(1, socket.CMSG_SPACE(12))
        got["go"] = go
        got["fds"] = [struct.unpack("3i", blob) for _l, _t, blob in ancdata]
        for fds in got["fds"]:  # type: ignore[attr-defined]
            for fd in fds:
                os.close(fd)
        conn.sendall(bytes([7]))
        conn.close()

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    hook = Path(sys.executable).parent / "kvm-ifup"
    run = subprocess.run([sys.executable, "-S", "-X", "importtime", str(hook), "tap0"],
                         env={"NICHOOKS_STATE_DIR": str(state), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30)
    thread.join(timeout=10)
    listener.close()
    assert run.returncode == 7, run.stderr
    assert got["go"] == b"G" and len(got["fds"]) == 1  # type: ignore[arg-type]
    assert got["early"] == []
    assert b"kvm_ifup\0" in got["data"]  # type: ignore[operator]
    bare = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c", "pass"],
                          capture_output=True, text=True, timeout=30)
    startup = set(imported_by(bare.stderr))  # what any `python3 -S` imports
    foreign = [name for name in imported_by(run.stderr) if name not in startup
               and name not in sys.builtin_module_names and name != "nichooks_fastpath"]
    assert foreign == [], foreign
    assert "nichooks_fastpath" in imported_by(run.stderr)


def imported_by(importtime: str) -> list[str]:
    return [line.split("|")[-1].strip() for line in importtime.splitlines()
            if line.startswith("import time:") and "|" in line][1:]
