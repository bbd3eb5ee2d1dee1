"""The agent's exit status (nichooks/serve/process.py): 0 after an orderly stop, 1 only
when the hook server died on its own. The server ends when its pipe from the agent
closes, so an orderly stop ends it too: that end must never be taken for a death.

The server here is a stand-in (a forked child that ends when its pipe closes, as
server.spawn's does), and the races are forced, not waited for: each test makes the
server's exit happen, and waits for it, at the exact point where a SIGCHLD handler
could see it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nichooks import settings as settingsmod
from nichooks.errors import EXIT_OK, EXIT_PLUMBING
from nichooks.log import HookLog
from nichooks.serve import process

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


class Log(HookLog):
    """The agent's log, kept in memory; `on_started` runs when the loop says it has
    started (its signal handlers are in place by then)."""

    def __init__(self, on_started: Any = None) -> None:
        super().__init__(context="agent")
        self.lines: list[tuple[str, dict[str, Any]]] = []
        self.on_started = on_started

    def _emit(self, priority: int, event: str, kv: dict[str, Any]) -> None:
        self.lines.append((event, kv))
        if kv.get("result") == "started" and self.on_started is not None:
            self.on_started()

    def results(self) -> list[str]:
        return [str(kv.get("result")) for _event, kv in self.lines]


@pytest.fixture(autouse=True)
def own_signals() -> Iterator[None]:
    """The loop installs handlers and a wakeup fd in this (pytest's) process."""
    saved = {signum: signal.getsignal(signum) for signum in HANDLED}
    try:
        yield
    finally:
        wakeup = signal.set_wakeup_fd(-1)
        if wakeup >= 0:
            os.close(wakeup)
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def fake_server(*, dies: bool = False) -> tuple[int, int]:
    """(pid, the pipe end whose closing ends it), like server.spawn; `dies`: it exits
    at once, as a crashed server would."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(write_end)
            while not dies and os.read(read_end, 1):
                pass
        finally:
            os._exit(0)
    os.close(read_end)
    return pid, write_end


def exited(pid: int) -> None:
    """Block until `pid` has exited (its SIGCHLD is sent by then), without reaping it."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass  # the agent's SIGCHLD handler reaped it meanwhile


def gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def run_loop(tmp_path: Path, pid: int, pipe: int, log: Log) -> int:
    settings = settingsmod.load({"NICHOOKS_STATE_DIR": str(tmp_path / "state"),
                                 "NICHOOKS_CONF_DIR": str(tmp_path / "conf")})
    settings.state_dir.mkdir()
    (settings.state_dir / "agent.pid").write_text(f"{os.getpid()}\n")
    # A loop that failed to notice anything is ended rather than left hanging.
    guard = threading.Timer(10, os.kill, (os.getpid(), signal.SIGTERM))
    guard.start()
    try:
        return process._loop(settings, False, log, pid, pipe, None, watch=False)
    finally:
        guard.cancel()


def terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before os.kill returns


def test_server_ending_as_the_agent_closes_its_pipe_is_not_a_death(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: on SIGTERM the agent closes the server's pipe; the server ends at
    once; its SIGCHLD must not be handled as "the server died" (exit 1)."""
    pid, pipe = fake_server()
    real_close = os.close

    def close(fd: int) -> None:
        real_close(fd)
        if fd == pipe:
            exited(pid)  # the server is gone before the agent's next step

    monkeypatch.setattr(os, "close", close)
    log = Log(on_started=terminate_self)
    assert run_loop(tmp_path, pid, pipe, log) == EXIT_OK, log.lines
    monkeypatch.undo()
    assert "hook server died" not in log.results()
    assert gone(pid)  # reaped, by the agent


def test_server_ending_after_a_stop_signal_is_not_a_death(tmp_path: Path) -> None:
    """A stop signal to the process group (Ctrl-C of `agent --foreground`) ends the
    server too: if it exits before the agent closes its pipe, that is still a stop."""
    pid, pipe = fake_server()

    def stop_both() -> None:
        terminate_self()
        os.kill(pid, signal.SIGKILL)
        exited(pid)
        os.kill(os.getpid(), signal.SIGCHLD)  # in case the kernel's has not been handled yet

    log = Log(on_started=stop_both)
    assert run_loop(tmp_path, pid, pipe, log) == EXIT_OK, log.lines
    assert "hook server died" not in log.results()
    assert gone(pid)


def test_a_server_that_dies_makes_the_agent_exit_1(tmp_path: Path) -> None:
    pid, pipe = fake_server(dies=True)
    log = Log()
    assert run_loop(tmp_path, pid, pipe, log) == EXIT_PLUMBING, log.lines
    assert "hook server died" in log.results()
    assert gone(pid)
    assert not (tmp_path / "state" / "agent.pid").exists()


def test_warming_nftables_without_the_binding_or_the_library_is_not_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent loads libnftables' binding and library ahead of the calls, but a host
    without them (antispoof off, openvswitch only) still runs the agent."""
    from nichooks.host import nft

    monkeypatch.setattr(nft, "_module", [])
    monkeypatch.setattr(nft, "BINDING", tmp_path / "no-binding")
    process._warm_nftables()
    assert nft._module == []
    monkeypatch.undo()
    monkeypatch.setattr(process, "NFT_LIBRARY", "libnichooks-no-such-library.so.1")
    process._warm_nftables()
