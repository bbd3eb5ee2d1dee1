"""Run a nichooks entry point on one hostile input in a forked child, and report
everything a caller could observe, plus what it did to the machine.

The child is a fork of a process that has already imported nichooks and its
libraries, so a case costs a few milliseconds instead of a new interpreter (~300 ms).
It optionally moves into another network namespace first (`netns`): a brand-new
empty one, or a test's throwaway one, so that whatever a hostile name happens to
match, the only device there is `lo`, never one of the machine's own. It records,
through a Python audit hook (PEP 578), every program started and every file opened
for writing, created, removed, renamed or chmod-ed, so a test can check "never a
shell" and "nothing written outside the state directory" directly instead of
guessing from side effects. With `trace=True` the child and everything it starts also
run under `strace -f -y`, which reports every file the kernel actually opened, by the
path it resolved to: a read (or write) through a symlink out of a directory is seen
as the file it reached, whatever name was opened and from which directory
descriptor. A SIGALRM turns a hang
(a FIFO planted where a file is expected, a lock never released) into a report
that says where it hung.

Also a module (`python -m tests.integration.hostile_runner`) that reads one JSON
case per line on stdin and answers one JSON outcome per line, so one warm process
inside a test's network namespace can run a whole hypothesis property.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

CLONE_NEWNET = 0x40000000
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "busybox", "csh", "tcsh", "fish"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Audit events that change the file system; the first argument is the path (or fd).
_FS_EVENTS = frozenset({"os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.symlink", "os.link",
                        "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree",
                        "shutil.move", "shutil.copyfile", "shutil.copytree", "os.mkfifo",
                        "os.mknod"})
_EXEC_EVENTS = frozenset({"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile"})


@dataclass
class Outcome:
    """What one call did. `rc` is None when the entry function did not return."""

    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    escaped: str | None = None   # an exception that escaped the entry function, with traceback
    hung: str | None = None      # where it was when the alarm fired
    execs: list[list[str]] = field(default_factory=list)
    shell_calls: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)   # real paths changed, each once
    # With trace=True: [how, path] for every successful open(2)/openat(2)/openat2(2) by
    # the child or any process it started, `path` being the file the kernel opened
    # (symlinks followed) and `how` one of "read", "write" or "path" (O_PATH: looked at,
    # never read). None when not traced.
    opened: list[list[str]] | None = None

    def problems(self, allowed_roots: Sequence[str] = ()) -> list[str]:
        """Everything in this outcome that a hook must never do, whatever its input."""
        found = []
        if self.hung:
            found.append(f"hung: {self.hung}")
        if self.escaped:
            found.append(f"exception escaped: {self.escaped}")
        if "Traceback" in self.stderr or "Traceback" in self.stdout:
            found.append("traceback printed")
        if "internal error" in self.stderr:
            found.append("internal error (an unexpected exception) instead of a clean refusal")
        found += [f"ran a shell: {c}" for c in self.shell_calls]
        found += [f"wrote outside the state directory: {w}" for w in self.writes
                  if not any(w == r or w.startswith(r.rstrip("/") + "/") for r in allowed_roots)]
        return found

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    def opened_under(self, root: str, how: str) -> list[str]:
        """The distinct paths under `root` (itself included) opened `how` (traced runs only)."""
        assert self.opened is not None, "this case was not run with trace=True"
        prefix = root.rstrip("/") + "/"
        return sorted({p for h, p in self.opened if h == how and (p == root or p.startswith(prefix))})


def _real(path: Any, dir_fd: Any = None, follow: bool = True) -> str | None:
    """Where a path given to an audited call really points (lexically resolved
    against the cwd or the directory fd, then with symlinks in existing parents;
    the last component too only when the call follows it: open does, while rename,
    unlink, mkdir and friends act on a symlink itself)."""
    if isinstance(path, int):
        return None
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        return None
    if not os.path.isabs(text):
        base = os.getcwd()
        if isinstance(dir_fd, int) and dir_fd >= 0:
            try:
                base = os.readlink(f"/proc/self/fd/{dir_fd}")
            except OSError:
                base = f"<fd {dir_fd}>"
        text = os.path.join(base, text)
    if follow:
        return os.path.realpath(text)
    parent, name = os.path.split(os.path.normpath(text))
    if name in ("", ".", ".."):
        return os.path.realpath(text)
    return os.path.join(os.path.realpath(parent), name)


class _Recorder:
    """The audit hook: collects programs started and paths changed. Audit hooks
    cannot be removed, so it records only while `active` (it lives in a child)."""

    def __init__(self) -> None:
        self.active = False
        self.execs: list[list[str]] = []
        self.shell_calls: list[str] = []
        self.writes: list[str] = []

    def _exec(self, argv: list[str], shell_text: str | None = None) -> None:
        self.execs.append(argv)
        name = os.path.basename(argv[0]) if argv else ""
        if shell_text is not None or name in SHELLS:
            self.shell_calls.append(shell_text or " ".join(argv))

    def _write(self, path: Any, dir_fd: Any = None, follow: bool = True) -> None:
        real = _real(path, dir_fd, follow)
        if real is not None and real not in self.writes:
            self.writes.append(real)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        self.active = False  # what we call here must not re-enter
        try:
            if event == "subprocess.Popen":
                executable, argv = args[0], args[1]
                words = [os.fsdecode(argv)] if isinstance(argv, (str, bytes)) else \
                    [os.fsdecode(a) for a in argv]
                if executable is not None:
                    words = [os.fsdecode(executable), *words[1:]]
                self._exec(words)
            elif event == "os.system":
                self._exec(["/bin/sh", "-c", os.fsdecode(args[0])], shell_text=os.fsdecode(args[0]))
            elif event in _EXEC_EVENTS:
                argv = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []
                self._exec([os.fsdecode(args[0]), *[os.fsdecode(a) for a in argv][1:]])
            elif event == "open":
                path, _mode, flags = args
                if isinstance(flags, int) and flags & _WRITE_FLAGS:
                    self._write(path, follow=not flags & os.O_NOFOLLOW)
            elif event in _FS_EVENTS:
                dir_fd = args[-1] if event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod",
                                               "os.chown", "os.utime", "os.mkfifo") else None
                follows = event in ("os.chmod", "os.chown", "os.truncate", "os.utime",
                                    "shutil.copyfile")
                self._write(args[0], dir_fd, follow=follows)
                if event in ("os.rename", "os.link", "shutil.move") and len(args) > 1:
                    self._write(args[1], follow=False)
        finally:
            self.active = True


_RECORDER: _Recorder | None = None
_STDOUT = (getattr(sys.__stdout__, "encoding", None) or "utf-8",
           getattr(sys.__stdout__, "errors", None) or "strict")
_STDERR = (getattr(sys.__stderr__, "encoding", None) or "utf-8",
           getattr(sys.__stderr__, "errors", None) or "backslashreplace")


def _recorder() -> _Recorder:
    global _RECORDER
    if _RECORDER is None:
        _RECORDER = _Recorder()
        sys.addaudithook(_RECORDER)
    return _RECORDER


def preload() -> None:
    """Import everything a hook may import, so forked children start warm."""
    import configparser  # noqa: F401

    import filelock  # noqa: F401

    import nichooks.callers.ganeti
    import nichooks.callers.ganeti_nic_env
    import nichooks.callers.ganeti_run_dir
    import nichooks.callers.ganeti_runtime
    import nichooks.callers.shellvars
    import nichooks.callers.xen
    import nichooks.callers.xen_vif
    import nichooks.cli
    import nichooks.engine.custom
    import nichooks.entry
    import nichooks.host.announce
    import nichooks.host.netlink
    import nichooks.host.openflow
    import nichooks.host.ovsdb
    import nichooks.host.ovsdb_rpc
    import nichooks.host.ovsdb_view
    import nichooks.modes.registry
    import nichooks.ops.plug
    import nichooks.ops.unplug

    nichooks.modes.registry.load_all()  # every mode: hooks import them lazily
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        pass


def _call(entry: str, argv: Sequence[str], env: Mapping[str, str]) -> int:
    if env.get("NICHOOKS_TEST_FAULT"):  # the test-only seam a hook process would load
        import importlib.util

        from tests.support.hooks import FAULT_SEAM

        os.environ["NICHOOKS_TEST_FAULT"] = env["NICHOOKS_TEST_FAULT"]
        spec = importlib.util.spec_from_file_location("fault_seam", FAULT_SEAM / "sitecustomize.py")
        assert spec is not None and spec.loader is not None
        seam = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(seam)
    if entry == "ifup":
        from nichooks.entry import kvm_ifup

        return kvm_ifup(list(argv), env)
    if entry == "ifdown":
        from nichooks.entry import kvm_ifdown

        return kvm_ifdown(list(argv), env)
    if entry == "vif":
        from nichooks.entry import vif_ganeti

        return vif_ganeti(list(argv), env)
    if entry == "cli":
        from nichooks.cli import main

        return main(list(argv))
    raise ValueError(f"unknown entry {entry!r}")


def _enter_netns(netns: str) -> None:
    """Move this process into a namespace: "new" makes a fresh one (unshare, which
    costs tens of milliseconds under load), a path joins an existing one (setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if netns == "new":
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        return
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({netns})")
    finally:
        os.close(fd)


def _child(entry: str, argv: Sequence[str], env: Mapping[str, str], cwd: str,
           netns: str | None, timeout: float, out_path: str, err_path: str,
           result_path: str) -> None:
    """Never returns: the child's whole life."""
    outcome = Outcome()

    def finish() -> None:
        recorder = _RECORDER
        if recorder is not None:
            recorder.active = False
            outcome.execs, outcome.shell_calls = recorder.execs, recorder.shell_calls
            outcome.writes = recorder.writes
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        with open(result_path, "w") as f:
            json.dump(asdict(outcome), f)
        os._exit(0)

    def alarm(signum: int, frame: Any) -> None:
        outcome.hung = "".join(traceback.format_stack(frame)[-4:]).strip()
        finish()

    try:
        if netns:
            _enter_netns(netns)
        os.chdir(cwd)
        os.umask(0o077)  # as Ganeti runs hooks
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out_path), (2, err_path)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        # The same encodings and error handlers the interpreter gives a hook's own
        # stdio (stderr: backslashreplace), so undecodable bytes behave as for real.
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False, encoding=_STDOUT[0], errors=_STDOUT[1])  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, encoding=_STDERR[0], errors=_STDERR[1])  # noqa: SIM115
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(max(int(timeout), 1))
        recorder = _recorder()
        recorder.active = True
        try:
            outcome.rc = _call(entry, argv, dict(env))
        finally:
            recorder.active = False
    except SystemExit as exc:  # argparse, or a sys.exit deep inside
        outcome.escaped = f"SystemExit({exc.code!r})"
        outcome.rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        outcome.escaped = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    signal.alarm(0)
    finish()


# -- strace: what the kernel really opened ------------------------------------------------
# `openat(AT_FDCWD</cwd>, "name", O_RDONLY|O_CLOEXEC) = 3</the/file/opened>` (strace -y):
# the call, its arguments, and the path of the descriptor it returned.
_TRACED_OPEN = re.compile(r"^(?:\d+\s+)?(open|openat|openat2)\((.*)\) = \d+<(.*)>$")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_WRITING = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


def strace_path() -> str | None:
    return shutil.which("strace")


def _classify(args: str) -> str:
    flags = set(re.findall(r"\bO_[A-Z0-9_]+", _QUOTED.sub('""', args)))
    if "O_PATH" in flags:
        return "path"
    return "write" if flags & set(_WRITING) else "read"


def parse_trace(lines: Sequence[str]) -> list[list[str]]:
    """[how, path] of every successful open in strace -y output (one file per process,
    -ff, so no call is split across lines by another process's)."""
    found = []
    for line in lines:
        match = _TRACED_OPEN.match(line.rstrip("\n"))
        if match:
            path = match.group(3)
            if path.endswith(" (deleted)"):
                path = path[: -len(" (deleted)")]
            found.append([_classify(match.group(2)), path])
    return found


def _attach(pid: int, prefix: str) -> subprocess.Popen[bytes]:
    """strace -f on `pid` (waiting on a pipe in the child), returned once attached."""
    tool = strace_path()
    if tool is None:
        raise RuntimeError("strace is not installed: tracing needs it (Debian package strace)")
    with open(prefix + "-errors", "wb") as errors:  # a file: a full pipe would stall strace
        tracer = subprocess.Popen(
            [tool, "-f", "-ff", "-qq", "-y", "-e", "trace=open,openat,openat2", "-e", "signal=none",
             "-o", prefix, "-p", str(pid)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=errors)
    deadline = time.monotonic() + 60
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                tracer_pid = next((ln.split()[1] for ln in f if ln.startswith("TracerPid:")), "0")
        except OSError:
            tracer_pid = "0"
        if tracer_pid != "0":
            return tracer
        if tracer.poll() is not None or time.monotonic() > deadline:
            tracer.kill()
            tracer.wait()
            with open(prefix + "-errors", encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"strace did not attach to {pid}: {f.read().strip()}")
        time.sleep(0.002)


def _wait_for_tracer(fd: int) -> None:
    """In the child: block until the parent says strace is attached (or gave up)."""
    if os.read(fd, 1) != b"g":
        os._exit(98)
    os.close(fd)


def run_case(entry: str, argv: Sequence[str], env: Mapping[str, str], *, cwd: str = "/",
             netns: str | None = None, timeout: float = 10.0, trace: bool = False) -> Outcome:
    """Run one call of `entry` ("ifup", "ifdown", "vif" or "cli") in a forked child,
    in the caller's network namespace, a new empty one (`netns="new"`) or the one
    at the path `netns` (/run/netns/NAME). With `trace`, under strace (Outcome.opened)."""
    with tempfile.TemporaryDirectory(prefix="nh-case-") as scratch:
        out_path, err_path = os.path.join(scratch, "out"), os.path.join(scratch, "err")
        result_path = os.path.join(scratch, "result")
        trace_prefix = os.path.join(scratch, "trace")
        sys.stdout.flush()
        sys.stderr.flush()
        go_r, go_w = os.pipe() if trace else (-1, -1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                if trace:
                    os.close(go_w)
                    _wait_for_tracer(go_r)
                _child(entry, argv, env, cwd, netns, timeout, out_path, err_path, result_path)
            finally:
                os._exit(99)
        tracer = None
        if trace:
            os.close(go_r)
            try:
                tracer = _attach(pid, trace_prefix)
                os.write(go_w, b"g")
            except BaseException:
                os.close(go_w)  # the child reads end-of-file and exits without running
                os.waitpid(pid, 0)
                raise
            os.close(go_w)

        deadline = time.monotonic() + timeout + 15
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                if tracer is not None:
                    tracer.kill()
                    tracer.wait()
                return Outcome(hung="the child did not finish and was killed")
            time.sleep(0.002)
        try:
            with open(result_path) as f:
                outcome = Outcome(**json.load(f))
        except (OSError, ValueError):
            outcome = Outcome(escaped=f"the child died without a report (wait status {status})")
        for name, path in (("stdout", out_path), ("stderr", err_path)):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    setattr(outcome, name, f.read())
            except OSError:
                pass
        if tracer is not None:
            # strace ends when the last traced process does; one a script left running
            # would keep it going, and is a failure of its own (stray processes).
            try:
                tracer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait()
                outcome.hung = (outcome.hung or "") + "; a traced process outlived the call"
            lines: list[str] = []
            for path in sorted(glob.glob(glob.escape(trace_prefix) + ".*")):
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines += f.readlines()
            outcome.opened = parse_trace(lines)
        return outcome


def main() -> int:
    """One JSON case per stdin line ({"entry", "argv", "env", "cwd", "timeout"}),
    one JSON outcome per stdout line."""
    preload()
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        outcome = run_case(case["entry"], case["argv"], case["env"], cwd=case.get("cwd", "/"),
                           timeout=case.get("timeout", 10.0))
        sys.stdout.write(json.dumps(asdict(outcome)) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
