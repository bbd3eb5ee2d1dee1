"""Running the administrator's own scripts after the built-in work.

Scripts live in $NICHOOKS_CONF_DIR/ifup.d and ifdown.d and run in name order, as
run-parts would pick them: editor backups and package-manager leftovers are skipped,
and anything writable by someone other than root is refused, because a hook runs as
root on every instance start.

Each script runs in its own session with stdin closed, only fds 0-2 inherited (the
tap fd QEMU hands us must not outlive us) and output captured, under a timeout after
which its whole process group is killed: Ganeti waits for our stdout to close, so a
child left behind would hang the job.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nichooks.log import HookLog

# run-parts --lsbsysinit style: skip backups, dpkg leftovers and dotfiles.
_SKIP = re.compile(r"^\.|~$|\.dpkg-(old|dist|new|tmp)$|\.(bak|orig|rej|swp)$")


@dataclass(frozen=True)
class ScriptFailure:
    script: Path
    reason: str


def unsafe_reason(path: Path, st: os.stat_result) -> str | None:
    """Why a script (or its directory) must not be run, or None."""
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def list_scripts(directory: Path) -> tuple[list[Path], list[ScriptFailure]]:
    """(scripts to run, refusals), in name order."""
    try:
        dir_st = directory.stat()
    except FileNotFoundError:
        return [], []
    except OSError as exc:  # a symlink loop: say so, as for any unusable script directory
        return [], [ScriptFailure(directory, f"refusing to run scripts: {exc.strerror or exc}")]
    if not stat.S_ISDIR(dir_st.st_mode):
        return [], [ScriptFailure(directory, "refusing to run scripts: not a directory")]
    reason = unsafe_reason(directory, dir_st)
    if reason:
        return [], [ScriptFailure(directory, f"refusing to run scripts: {reason}")]
    run: list[Path] = []
    refused: list[ScriptFailure] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        return [], [ScriptFailure(directory, f"refusing to run scripts: {exc.strerror or exc}")]
    for name in names:
        if _SKIP.search(name):
            continue
        path = directory / name
        try:
            st = path.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IXUSR:
            continue
        reason = unsafe_reason(path, st)
        if reason:
            refused.append(ScriptFailure(path, f"refusing to run: {reason}"))
        else:
            run.append(path)
    return run, refused


def run_scripts(directory: Path, tap: str, env: Mapping[str, str], timeout: float,
                log: HookLog, *, stop_on_failure: bool) -> list[ScriptFailure]:
    """Run every script; return the failures (the first one only if stop_on_failure)."""
    scripts, failures = list_scripts(directory)
    for failure in failures:
        log.error("custom-script-refused", script=failure.script, reason=failure.reason)
    if failures and stop_on_failure:
        return failures[:1]
    for script in scripts:
        result = _run_one(script, tap, env, timeout, log)
        if result:
            failures.append(result)
            if stop_on_failure:
                break
    return failures


def _run_one(script: Path, tap: str, env: Mapping[str, str], timeout: float,
             log: HookLog) -> ScriptFailure | None:
    try:
        proc = subprocess.Popen([str(script), tap], env=dict(env), cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, close_fds=True,
                                start_new_session=True)
    except OSError as exc:
        log.error("custom-script", script=script, result="cannot-run", reason=exc.strerror)
        return ScriptFailure(script, f"cannot run {script}: {exc.strerror}")
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        log.error("custom-script", script=script, result="timeout", seconds=timeout)
        return ScriptFailure(script, f"{script} did not finish within {timeout:g}s and was killed")
    _kill_group(proc)  # whatever it left running in its session
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        last = text.splitlines()[-1] if text else ""
        log.error("custom-script", script=script, result=f"exit {proc.returncode}", output=text)
        return ScriptFailure(script, f"{script} exited with status {proc.returncode}"
                             + (f": {last}" if last else ""))
    log.info("custom-script", script=script, result="ok", output=text)
    return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()
