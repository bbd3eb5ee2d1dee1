"""Running the administrator's own scripts after the built-in work.

Scripts live in $NICHOOKS_CONF_DIR/ifup.d and ifdown.d and run in name order, as
run-parts would pick them: editor backups and package-manager leftovers are skipped,
and anything writable by someone other than root is refused, because a hook runs as
root on every instance start.

"Writable by someone other than root" covers the whole way to the file, not just the
file: a symlink is followed by hand, one component at a time from a directory
descriptor, and every symlink met must be root's and every directory walked through
(the scripts directory, `/` for an absolute target, each directory of each target)
must be root's and writable by nobody else, sticky or not. Otherwise whoever owns that
directory could swap what the name points at after we looked. The file found at the
end is opened with O_PATH|O_NOFOLLOW, checked with fstat, and that same open file is
what runs (through /proc/self/fd/N, the descriptor passed to the child so that a `#!`
interpreter can open it again): what was checked is what runs, whatever the names
point at by then.

Each script runs in its own session with stdin closed, only fds 0-2 and its own
script descriptor inherited (the tap fd QEMU hands us must not outlive us) and output
captured, under a timeout after which its whole process group is killed: Ganeti waits
for our stdout to close, so a child left behind would hang the job.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nichooks.log import HookLog
from nichooks.model.nic import GANETI_VARS
from nichooks.trust import untrusted_reason

# run-parts --lsbsysinit style: skip backups, dpkg leftovers and dotfiles.
_SKIP = re.compile(r"^\.|~$|\.dpkg-(old|dist|new|tmp)$|\.(bak|orig|rej|swp)$")

# O_PATH: opening a name never has side effects (no device open, no FIFO to block on)
# and needs no read permission; an O_PATH descriptor can still be fstat-ed and run.
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as the kernel's own path walk: more means a loop


@dataclass(frozen=True)
class ScriptFailure:
    script: Path
    reason: str


class _Unsafe(Exception):
    """A symlink or directory on the way to a script that someone other than root could
    change: the message names it and says why."""


@dataclass(frozen=True)
class _Found:
    """An O_PATH descriptor on what a name resolved to, checked all the way there."""

    fd: int
    st: os.stat_result
    where: str      # its resolved path, for messages only
    via_link: bool  # whether a symlink was followed to get there


@dataclass(frozen=True)
class _Script:
    """A script that passed every check, held open so the checked file is what runs."""

    path: Path
    fd: int


def _check_dir(fd: int, where: str) -> None:
    """Refuse a directory a path walk enters: its owner, or anyone who may write it,
    could replace the entries below it between our check and the run."""
    reason = untrusted_reason(Path(where), os.fstat(fd))
    if reason:
        raise _Unsafe(reason)


def _walk(start: int, where: str, name: str) -> _Found:
    """Resolve `name` under the directory `start` (already checked by the caller) as the
    kernel would, but one component at a time from descriptors, checking every symlink
    and every directory on the way, and open what it ends at without following it.

    Walking from descriptors means a directory, once checked, is the one whose entries
    we read next, whatever its name points at by then. Raises _Unsafe for a link or
    directory someone other than root controls, OSError when the name does not resolve
    (missing, a loop, a file used as a directory).
    """
    cur = os.open(".", _PATH_FLAGS | os.O_DIRECTORY, dir_fd=start)
    pending = deque([name])
    links = 0
    try:
        while True:
            comp = pending.popleft()
            if comp in ("", ".", ".."):
                if comp == "..":
                    parent = os.open("..", _PATH_FLAGS | os.O_DIRECTORY, dir_fd=cur)
                    os.close(cur)
                    cur = parent
                    where = os.path.dirname(where) or "/"
                    _check_dir(cur, where)
                if not pending:
                    found = _Found(cur, os.fstat(cur), where, links > 0)
                    cur = -1
                    return found
                continue
            path = os.path.join(where, comp)
            st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                # A symlink's own mode means nothing (always 0777) and it cannot be
                # changed in place; its directory was checked. Its owner still must be
                # root: anything on the way that a user owns is refused.
                if st.st_uid != 0:
                    raise _Unsafe(f"{path} is a symlink owned by uid {st.st_uid}, not root")
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(comp, dir_fd=cur)
                if target.startswith("/"):
                    root = os.open("/", _PATH_FLAGS | os.O_DIRECTORY)
                    os.close(cur)
                    cur = root
                    where = "/"
                    _check_dir(cur, where)
                pending.extendleft(reversed(target.split("/")))
                continue
            fd = os.open(comp, _PATH_FLAGS, dir_fd=cur)
            try:
                fst = os.fstat(fd)
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                    raise _Unsafe(f"{path} changed while it was being checked")
                if pending:
                    if not stat.S_ISDIR(fst.st_mode):
                        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                    _check_dir(fd, path)
            except BaseException:
                os.close(fd)
                raise
            if not pending:
                return _Found(fd, fst, path, links > 0)
            os.close(cur)
            cur = fd
            where = path
    finally:
        if cur >= 0:
            os.close(cur)


def _open_directory(directory: Path) -> tuple[_Found | None, list[ScriptFailure]]:
    """The scripts directory, checked like a script's path (its own name may be a
    symlink too); its parent is where the configuration says, trusted as before."""
    def refuse(why: str) -> tuple[_Found | None, list[ScriptFailure]]:
        return None, [ScriptFailure(directory, f"refusing to run scripts: {why}")]

    try:
        parent = os.open(directory.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, []
    except OSError as exc:
        return refuse(exc.strerror or str(exc))
    try:
        found = _walk(parent, os.path.abspath(directory.parent), directory.name)
    except FileNotFoundError:
        return None, []
    except OSError as exc:  # a symlink loop: say so, as for any unusable script directory
        return refuse(exc.strerror or str(exc))
    except _Unsafe as exc:
        return refuse(str(exc))
    finally:
        os.close(parent)
    reason = None
    if not stat.S_ISDIR(found.st.st_mode):
        reason = "not a directory"
    else:
        reason = untrusted_reason(Path(found.where) if found.via_link else directory, found.st)
    if reason:
        os.close(found.fd)
        return refuse(reason)
    return found, []


def _scan(directory: Path) -> tuple[list[_Script], list[ScriptFailure]]:
    """(scripts to run, held open; refusals), in name order. The caller closes the
    descriptors."""
    top, refusals = _open_directory(directory)
    if top is None:
        return [], refusals
    run: list[_Script] = []
    refused: list[ScriptFailure] = []
    try:
        try:
            listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=top.fd)
            try:
                names = sorted(os.listdir(listing))
            finally:
                os.close(listing)
        except OSError as exc:
            return [], [ScriptFailure(directory, f"refusing to run scripts: {exc.strerror or exc}")]
        for name in names:
            if _SKIP.search(name):
                continue
            path = directory / name
            try:
                found = _walk(top.fd, top.where, name)
            except OSError:
                continue  # dangling, a loop: nothing to run, as run-parts would skip it
            except _Unsafe as exc:
                refused.append(ScriptFailure(path, f"refusing to run: {path} is a symlink, and {exc}"))
                continue
            st = found.st
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IXUSR:
                os.close(found.fd)
                continue
            reason = untrusted_reason(Path(found.where) if found.via_link else path, st)
            if reason:
                os.close(found.fd)
                refused.append(ScriptFailure(path, f"refusing to run: {path} is a symlink, and {reason}"
                                             if found.via_link else f"refusing to run: {reason}"))
            else:
                run.append(_Script(path, found.fd))
    except BaseException:
        for script in run:
            os.close(script.fd)
        raise
    finally:
        os.close(top.fd)
    return run, refused


def list_scripts(directory: Path) -> tuple[list[Path], list[ScriptFailure]]:
    """(scripts to run, refusals), in name order."""
    scripts, refused = _scan(directory)
    for script in scripts:
        os.close(script.fd)
    return [script.path for script in scripts], refused


def run_scripts(directory: Path, tap: str, env: Mapping[str, str], timeout: float,
                log: HookLog, *, stop_on_failure: bool) -> list[ScriptFailure]:
    """Run every script; return the failures (the first one only if stop_on_failure).

    Every script is checked and opened before the first one runs, so that one refusal
    stops an ifup before anything ran, and each runs from the descriptor it was checked
    through."""
    scripts, failures = _scan(directory)
    try:
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
    finally:
        for script in scripts:
            os.close(script.fd)


def _run_one(script: _Script, tap: str, env: Mapping[str, str], timeout: float,
             log: HookLog) -> ScriptFailure | None:
    """Run the checked open file, not whatever its name points at now. The descriptor
    goes to the child (pass_fds clears close-on-exec there): the kernel hands a `#!`
    interpreter /proc/self/fd/N as the script, which it must still be able to open.
    argv[0] stays the script's name."""
    path = script.path
    try:
        proc = subprocess.Popen([str(path), tap], executable=f"/proc/self/fd/{script.fd}",
                                env=dict(env), cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, close_fds=True, pass_fds=(script.fd,),
                                start_new_session=True)
    except OSError as exc:
        log.error("custom-script", script=path, result="cannot-run", reason=exc.strerror)
        return ScriptFailure(path, f"cannot run {path}: {exc.strerror}")
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        log.error("custom-script", script=path, result="timeout", seconds=timeout)
        return ScriptFailure(path, f"{path} did not finish within {timeout:g}s and was killed")
    _kill_group(proc)  # whatever it left running in its session
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        last = text.splitlines()[-1] if text else ""
        log.error("custom-script", script=path, result=f"exit {proc.returncode}", output=text)
        return ScriptFailure(path, f"{path} exited with status {proc.returncode}"
                             + (f": {last}" if last else ""))
    log.info("custom-script", script=path, result="ok", output=text)
    return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()


def run_custom(conf_dir: Path, timeout: float, tap: str, env: Mapping[str, str],
               variables: Mapping[str, str], action: str, context: str, log: HookLog,
               *, stop_on_failure: bool) -> list[ScriptFailure]:
    """The administrator's if<action>.d scripts for one NIC, with the caller's
    environment and the NIC's own variables. The variables may come from a journal
    that was tampered with: only Ganeti's names, never PATH or LD_PRELOAD for root-run
    scripts, never a NUL that execve refuses."""
    nic_vars = {k: v for k, v in variables.items()
                if k in GANETI_VARS and "\0" not in v and "=" not in k}
    script_env = {**env, **nic_vars, "ACTION": action, "NICHOOKS_CONTEXT": context}
    return run_scripts(conf_dir / f"if{action}.d", tap, script_env, timeout, log,
                       stop_on_failure=stop_on_failure)
