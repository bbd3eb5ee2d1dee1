"""A real QEMU for integration tests: a small QMP client and a VM context manager.

The VM has no disk and no guest OS: it exists only so that QEMU creates, hot-plugs and
destroys tap netdevs and runs their `script=` / `downscript=` hooks exactly as it does
in production. It is started *inside* a test's network namespace (`ip netns exec`,
which execs QEMU directly, so the Popen pid is QEMU's pid), with an explicit
environment, which QEMU hands on unchanged to the hook scripts it runs.

Facts about QEMU 7.2 this relies on (checked on this machine, see test_qemu.py):

- the QMP greeting is sent only once the main loop runs, i.e. after every `-netdev`
  has been created and its `script=` has exited 0; a failing script makes QEMU exit
  (status 1, "network script ... failed" on stderr) before any greeting;
- `netdev_add` of a tap runs `script=` synchronously; its failure is the QMP error;
- `netdev_del` runs `downscript=` synchronously and closes the tap fd (so the kernel
  removes the non-persistent tap) even while a NIC is still attached to it;
- on `quit` (and on SIGTERM/SIGINT) QEMU runs the downscript of every tap netdev that
  is still open; on SIGKILL nothing runs: the taps vanish with the fds, the journals
  stay. A downscript failure never fails anything: QEMU only prints it on stderr,
  which is why the VM's stderr is kept (`log()`).

Accelerator and CPU model: probed once per session (`qemu_accel()`), because `/dev/kvm`
may exist and yet refuse a CPU model. KVM on some hosts (nested, some clouds) rejects
an MSR that `-cpu max` sets -- QEMU 7.2 then aborts while creating the vCPU, before
any monitor is up ("error: failed to set MSR 0x10a ...", kvm_buf_set_msrs
assertion). `-machine accel=kvm:tcg` does not help there: its fallback is taken only
when KVM cannot be initialised at all. So the probe starts a VM like the tests' (same
machine, paused, no NIC), waits for its monitor, lets the vCPU run briefly and quits;
the first of `kvm:max`, `kvm:host`, `kvm:qemu64`, `tcg:max` that survives this is
used. NICHOOKS_TEST_QEMU_ACCEL replaces that list (whitespace-separated
`ACCEL[:CPU]`, e.g. "tcg" or "kvm:qemu64 tcg"); the choice is still probed and a
forced choice that does not start fails the test rather than being replaced or
skipped. NICHOOKS_TEST_QEMU names another QEMU binary. The choice and the reason for
it are printed and listed in the terminal summary (`report_qemu_accel()`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import served

QEMU = "/usr/bin/qemu-system-x86_64"
QEMU_ENV = "NICHOOKS_TEST_QEMU"          # another QEMU binary (a path)
ACCEL_ENV = "NICHOOKS_TEST_QEMU_ACCEL"   # candidates instead of the default list


def qemu_binary() -> str | None:
    """The QEMU system emulator to use, or None when this machine has none."""
    override = os.environ.get(QEMU_ENV)
    if override:  # a wrong path is an error, never a reason to skip
        if not os.access(override, os.X_OK):
            raise FileNotFoundError(f"{QEMU_ENV}={override}: not an executable")
        return override
    if os.access(QEMU, os.X_OK):
        return QEMU
    return shutil.which("qemu-system-x86_64")


# -- QMP ---------------------------------------------------------------------------


class QMPError(Exception):
    """A command answered with {"error": ...}."""

    def __init__(self, command: str, arguments: dict[str, Any], error: dict[str, Any]):
        self.command = command
        self.arguments = arguments
        self.error_class = error.get("class", "")
        self.desc = error.get("desc", "")
        super().__init__(f"QMP {command} {json.dumps(arguments)}: {self.error_class}: {self.desc}")


class QMPClosed(Exception):
    """The monitor connection ended (QEMU exited, or was never ready)."""


class QMP:
    """A synchronous QMP client over a unix socket.

    `execute()` returns the command's `return` value or raises QMPError. Asynchronous
    events that arrive meanwhile are not lost: every event is appended to `events`
    (the full history) and `wait_event()` can find one that already arrived.
    """

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._consumed = 0  # events[:_consumed] were already handed out by wait_event
        self._buf = b""
        self._next_id = 0
        self._sock: socket.socket | None = None
        self.greeting: dict[str, Any] | None = None

    # connection ---------------------------------------------------------------

    def connect(self, timeout: float | None = None) -> None:
        """Connect, read the greeting, negotiate capabilities."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout or self.timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        deadline = time.monotonic() + (timeout or self.timeout)
        msg = self._read_message(deadline)
        if "QMP" not in msg:
            raise QMPClosed(f"not a QMP greeting: {msg!r}")
        self.greeting = msg
        self.execute("qmp_capabilities")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # commands -----------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None, **kwargs: Any) -> Any:
        """Run one command; arguments from the dict and/or keywords (use the dict for
        names that are not Python identifiers, e.g. "x-foo-bar")."""
        args = {**(arguments or {}), **kwargs}
        self._next_id += 1
        msg_id = f"nht-{self._next_id}"
        request: dict[str, Any] = {"execute": command, "id": msg_id}
        if args:
            request["arguments"] = args
        self._send(request)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._read_message(deadline)
            if msg.get("id") != msg_id:
                continue  # events are recorded by _read_message; stray replies dropped
            if "error" in msg:
                raise QMPError(command, args, msg["error"])
            return msg.get("return")

    def cmd(self, command: str, **kwargs: Any) -> Any:
        """Shorthand: execute() with keyword arguments only."""
        return self.execute(command, **kwargs)

    # events -------------------------------------------------------------------

    def wait_event(self, name: str, timeout: float = 5.0,
                   match: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The first not yet consumed event called `name` whose `data` contains
        `match`; waits up to `timeout` seconds for it. None if it did not come."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._consumed, len(self.events)):
                ev = self.events[i]
                if ev.get("event") == name and _contains(ev.get("data", {}), match or {}):
                    self._consumed = i + 1
                    return ev
            self._consumed = len(self.events)
            if time.monotonic() >= deadline:
                return None
            try:
                self._read_message(deadline, events_only=True)
            except TimeoutError:
                return None

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [ev for ev in self.events if ev.get("event") == name]

    # wire ---------------------------------------------------------------------

    def _send(self, obj: dict[str, Any]) -> None:
        if self._sock is None:
            raise QMPClosed("not connected")
        try:
            self._sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as e:
            raise QMPClosed(f"QMP send failed: {e}") from e

    def _read_message(self, deadline: float, events_only: bool = False) -> dict[str, Any]:
        """The next message that is not an event (events are recorded and skipped);
        with events_only, return after recording one event."""
        if self._sock is None:
            raise QMPClosed("not connected")
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if not line.strip():
                    continue
                msg: dict[str, Any] = json.loads(line)
                if "event" in msg:
                    self.events.append(msg)
                    if events_only:
                        return msg
                    continue
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from QMP in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as e:
                raise TimeoutError("no answer from QMP in time") from e
            except OSError as e:
                raise QMPClosed(f"QMP connection failed: {e}") from e
            if not chunk:
                raise QMPClosed("QMP connection closed by QEMU")
            self._buf += chunk


def _contains(data: dict[str, Any], match: dict[str, Any]) -> bool:
    return all(data.get(k) == v for k, v in match.items())


# -- the VM ------------------------------------------------------------------------


@dataclass(frozen=True)
class Nic:
    """One guest NIC: a tap netdev and the virtio-net-pci device on it."""

    tap: str                      # host-side tap name (QEMU's ifname=)
    mac: str                      # the guest's MAC (the device's mac=)
    netdev_id: str = ""
    device_id: str = ""

    @property
    def netdev(self) -> str:
        return self.netdev_id or f"net-{self.tap}"

    @property
    def device(self) -> str:
        return self.device_id or f"dev-{self.tap}"


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    # If the test process dies without cleaning up, the kernel kills QEMU too.
    # (prctl survives the execve of `ip` and of QEMU: neither is set-uid.)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class QemuVM:
    """`with QemuVM(netns, nics, script=..., downscript=..., env=...) as vm:`

    Starts QEMU in the namespace (netns None: in the caller's own), waits until its
    QMP monitor is ready (which means every startup NIC's `script=` has run and
    succeeded, else StartError with QEMU's stderr), and offers `vm.qmp`,
    `vm.hotplug()`, `vm.unplug()`, `vm.quit()`. Leaving the block quits QEMU cleanly
    if it still runs (which runs the downscripts), else kills it by pid; the process
    is always waited for.
    """

    class StartError(Exception):
        pass

    def __init__(self, netns: Any, nics: Iterable[Nic], *, script: str, downscript: str,
                 env: dict[str, str], paused: bool = True, extra_args: Sequence[str] = (),
                 qemu: str | None = None, start_timeout: float = 30.0,
                 quit_timeout: float = 30.0, accel: Accel | None = None) -> None:
        self.netns: str | None = getattr(netns, "name", netns)  # None: this namespace
        self.nics = list(nics)
        self.script = script
        self.downscript = downscript
        self.env = dict(env)
        self.paused = paused
        self.extra_args = list(extra_args)
        self.qemu = qemu or qemu_binary() or QEMU
        self.accel = accel  # None: the session's probed choice, qemu_accel()
        self.start_timeout = start_timeout
        self.quit_timeout = quit_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMP | None = None
        self.returncode: int | None = None
        self.killed = False
        # Short path: a unix socket path must fit in 108 bytes.
        self.rundir = Path(tempfile.mkdtemp(prefix="nhq-", dir="/tmp"))
        self.qmp_path = self.rundir / "qmp.sock"
        self.log_path = self.rundir / "qemu.log"
        self._final_log = ""  # the log, kept once rundir is removed

    # command line -------------------------------------------------------------

    def tap_netdev_args(self, nic: Nic) -> dict[str, Any]:
        return {"type": "tap", "id": nic.netdev, "ifname": nic.tap,
                "script": self.script, "downscript": self.downscript}

    def argv(self) -> list[str]:
        accel = self.accel or qemu_accel(self.qemu)
        argv = [] if self.netns is None else ["ip", "netns", "exec", self.netns]
        argv += [
            self.qemu,
            *accel.args,
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-m", "64",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.paused:
            # Vcpus never run: no firmware spinning on "no bootable device" and
            # eating a core. Taps, hotplug and QMP work the same in prelaunch state.
            argv.append("-S")
        for nic in self.nics:
            nd = self.tap_netdev_args(nic)
            argv += ["-netdev", f"tap,id={nd['id']},ifname={nd['ifname']},"
                                f"script={nd['script']},downscript={nd['downscript']}",
                     "-device", f"virtio-net-pci,netdev={nic.netdev},mac={nic.mac},"
                                f"id={nic.device}"]
        return argv + self.extra_args

    # lifecycle ----------------------------------------------------------------

    def start(self) -> QemuVM:
        argv = self.argv()  # probes the accelerator first if need be (raises if none)
        if self.netns is not None:
            served.ensure(self.netns, self.env)  # NICHOOKS_TEST_SERVED: QEMU's hooks served
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, cwd="/",
                                         preexec_fn=_set_pdeathsig)
        try:
            self._connect()
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.StartError(
                    f"QEMU ({self._accel_text()}) exited with status {self.proc.returncode} "
                    f"before its monitor was ready:\n{self.log()}")
            if self.qmp_path.exists():
                qmp = QMP(self.qmp_path, timeout=max(1.0, deadline - time.monotonic()))
                try:
                    qmp.connect()
                except (OSError, QMPClosed, TimeoutError) as e:
                    qmp.close()
                    last = e
                else:
                    self.qmp = qmp
                    self.qmp.timeout = 30.0
                    return
            time.sleep(0.02)
        raise self.StartError(f"QEMU's ({self._accel_text()}) monitor not ready after "
                              f"{self.start_timeout}s ({last}):\n{self.log()}")

    def _accel_text(self) -> str:
        return " ".join((self.accel or qemu_accel(self.qemu)).args)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """Everything QEMU (and the hooks it ran) wrote on stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return self._final_log

    def quit(self) -> int:
        """QMP `quit`, then wait: QEMU runs the remaining downscripts on the way out.
        Returns QEMU's exit status."""
        assert self.proc is not None and self.qmp is not None
        with contextlib.suppress(QMPClosed):  # QEMU may close before answering
            self.qmp.execute("quit")
        self.returncode = self.proc.wait(timeout=self.quit_timeout)
        self.qmp.close()
        return self.returncode

    def stop(self) -> None:
        """Make sure QEMU is gone: quit if possible, else SIGKILL by pid; always wait."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None and self.qmp is not None:
                self.qmp.timeout = min(self.qmp.timeout, 10.0)
                with contextlib.suppress(Exception):
                    self.quit()
            if self.proc.poll() is None:
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
            self.returncode = self.proc.wait()
        finally:
            if self.qmp is not None:
                self.qmp.close()
            self._final_log = self.log()
            shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> QemuVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # hotplug ------------------------------------------------------------------

    def hotplug(self, nic: Nic) -> None:
        """netdev_add (runs the script; its failure is the QMP error), then device_add."""
        assert self.qmp is not None
        self.qmp.execute("netdev_add", self.tap_netdev_args(nic))
        try:
            self.qmp.execute("device_add", driver="virtio-net-pci", netdev=nic.netdev,
                             mac=nic.mac, id=nic.device)
        except QMPError:
            self.qmp.execute("netdev_del", id=nic.netdev)
            raise
        self.nics.append(nic)

    def device_del(self, nic: Nic, timeout: float = 2.0) -> bool:
        """Ask for the device's removal; True if QEMU reported DEVICE_DELETED within
        `timeout`. Without a guest OS to acknowledge the ACPI hot-unplug request, a
        PCI device on QEMU 7.2's default `pc` machine is never removed: False."""
        assert self.qmp is not None
        self.qmp.execute("device_del", id=nic.device)
        return self.qmp.wait_event("DEVICE_DELETED", timeout=timeout,
                                   match={"device": nic.device}) is not None

    def netdev_del(self, nic: Nic) -> None:
        """Destroy the tap backend: QEMU runs the downscript and closes the tap."""
        assert self.qmp is not None
        self.qmp.execute("netdev_del", id=nic.netdev)


# -- accelerator and CPU model -----------------------------------------------------------


@dataclass(frozen=True)
class Accel:
    """One way to run the vCPU: `-accel <accel> -cpu <cpu>`."""

    accel: str  # "kvm" or "tcg"
    cpu: str = "max"

    @property
    def args(self) -> list[str]:
        return ["-accel", self.accel, "-cpu", self.cpu]

    def __str__(self) -> str:
        return f"{self.accel}:{self.cpu}"


# In order of preference: max gives no CPUID warnings on KVM; host and a plain named
# model are what still starts when KVM refuses an MSR of max; TCG always starts.
DEFAULT_ACCELS = (Accel("kvm", "max"), Accel("kvm", "host"), Accel("kvm", "qemu64"),
                  Accel("tcg", "max"))
PROBE_START_TIMEOUT = 20.0
PROBE_SETTLE = 0.3  # seconds the probe VM must stay alive, paused, then running
PROBE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class AccelChoice:
    """The outcome of the probe: the chosen Accel (None: nothing starts) and why."""

    qemu: str
    chosen: Accel | None
    attempts: tuple[tuple[Accel, str], ...]  # (candidate, "ok" or why not)
    forced: str | None  # the value of NICHOOKS_TEST_QEMU_ACCEL, if set

    def describe(self) -> str:
        head = (f"QEMU accelerator: {' '.join(self.chosen.args)}" if self.chosen
                else "QEMU accelerator: NONE of the candidates starts")
        how = f"{ACCEL_ENV}={self.forced!r}" if self.forced else "probed"
        tried = "; ".join(f"{accel}: {outcome}" for accel, outcome in self.attempts)
        return f"{head} ({how}; {tried}) [{self.qemu}]"


def parse_accels(spec: str) -> tuple[Accel, ...]:
    """`ACCEL[:CPU]` candidates separated by whitespace ("auto": the default list)."""
    if spec.strip() in ("", "auto"):
        return DEFAULT_ACCELS
    accels = []
    for word in spec.split():
        accel, _, cpu = word.partition(":")
        if accel not in ("kvm", "tcg"):
            raise ValueError(f"{ACCEL_ENV}: {word!r}: the accelerator must be kvm or tcg")
        accels.append(Accel(accel, cpu or "max"))
    return tuple(accels)


def kvm_unusable() -> str | None:
    """Why /dev/kvm cannot be used by this process, or None if it can be opened."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None


def _log_summary(log: str, limit: int = 300) -> str:
    """QEMU's error lines (else its last lines) on one line, for a probe's outcome."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "assert" in line.lower()]
    text = " | ".join(errors or lines[-2:]) or "no output"
    return text if len(text) <= limit else text[:limit] + "..."


def probe_accel(qemu: str, accel: Accel) -> str | None:
    """None if a VM like the tests' (default machine, so a vCPU is created) starts with
    `accel`, keeps its vCPU paused, then running, for PROBE_SETTLE seconds each, and
    quits with status 0; else what went wrong. Runs in the caller's namespace, no NIC."""
    vm = QemuVM(None, [], script="no", downscript="no", env=PROBE_ENV, qemu=qemu,
                accel=accel, start_timeout=PROBE_START_TIMEOUT, quit_timeout=10.0)
    try:
        with vm:  # the monitor answers only once the vCPU exists (MSRs set or abort)
            assert vm.qmp is not None
            if accel.accel == "kvm" and not vm.qmp.execute("query-kvm").get("enabled"):
                return "QEMU is not using KVM"
            time.sleep(PROBE_SETTLE)
            vm.qmp.execute("cont")
            time.sleep(PROBE_SETTLE)
            status = vm.qmp.execute("query-status").get("status")
            if status != "running":
                return f"vCPU {status} after cont: {_log_summary(vm.log())}"
            if (rc := vm.quit()) != 0:
                return f"exit status {rc} on quit: {_log_summary(vm.log())}"
    except QemuVM.StartError:
        return (f"exited with status {vm.returncode} before its monitor was ready: "
                f"{_log_summary(vm.log())}")
    except (QMPError, QMPClosed, TimeoutError, OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}: {_log_summary(vm.log())}"
    return None


@functools.cache
def qemu_accel_choice(qemu: str) -> AccelChoice:
    """Probe the candidates once per session and QEMU binary (see the module doc)."""
    forced = os.environ.get(ACCEL_ENV) or None
    attempts: list[tuple[Accel, str]] = []
    chosen: Accel | None = None
    no_kvm = kvm_unusable()
    for accel in parse_accels(forced or ""):
        if accel.accel == "kvm" and no_kvm:
            attempts.append((accel, f"not tried, {no_kvm}"))
            continue
        failure = probe_accel(qemu, accel)
        attempts.append((accel, failure or "ok"))
        if failure is None:
            chosen = accel
            break
    choice = AccelChoice(qemu, chosen, tuple(attempts), forced)
    print(choice.describe(), flush=True)
    return choice


class NoAccel(RuntimeError):
    """No candidate accelerator starts QEMU: a test failure, never a skip."""


def qemu_accel(qemu: str | None = None) -> Accel:
    """The session's accelerator and CPU model for `qemu` (probed on first use)."""
    choice = qemu_accel_choice(qemu or qemu_binary() or QEMU)
    if choice.chosen is None:
        raise NoAccel(choice.describe())
    return choice.chosen


class _AccelSummary:
    """A plugin registered at run time: lists the probed choices in the terminal
    summary, so that every CI log tells which path the QEMU tests took."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if _probed:
            terminalreporter.write_sep("-", "QEMU accelerator")
        for qemu in _probed:
            try:
                line = qemu_accel_choice(qemu).describe()
            except Exception as e:  # e.g. a malformed NICHOOKS_TEST_QEMU_ACCEL
                line = f"QEMU accelerator: probe failed for {qemu}: {e}"
            terminalreporter.write_line(line)


_probed: list[str] = []  # the QEMU binaries qemu_accel_choice was asked about, in order


def report_qemu_accel(config: pytest.Config, qemu: str | None = None) -> Accel:
    """For a QEMU test to call first: probe (once), have the choice listed in the
    terminal summary, and return it. Raises NoAccel if nothing starts."""
    qemu = qemu or qemu_binary() or QEMU
    if qemu not in _probed:
        _probed.append(qemu)
    if not config.pluginmanager.has_plugin("nichooks-qemu-accel"):
        config.pluginmanager.register(_AccelSummary(), "nichooks-qemu-accel")
    return qemu_accel(qemu)


def pids_of(exe: str) -> set[int]:
    """Pids of running processes whose executable is `exe` (for leak checks)."""
    found = set()
    real = os.path.realpath(exe)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/exe") == real:
                    found.add(int(entry))
    return found
