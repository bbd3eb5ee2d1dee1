"""Custom scripts: order, environment, refusals, failures, timeouts."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from nichooks.engine.custom import list_scripts, run_scripts
from nichooks.log import HookLog
from tests.support.scripts import write_script


@pytest.fixture
def updir(tmp_path: Path) -> Path:
    d = tmp_path / "ifup.d"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to own files as root and as others")


def test_name_order_and_skipped_names(updir: Path) -> None:
    needs_root()
    for name in ("20-b", "10-a", "30-c~", "40-d.dpkg-old", ".hidden", "50-e.bak"):
        write_script(updir, name, "true")
    write_script(updir, "15-not-executable", "true", mode=0o644)
    (updir / "16-dir").mkdir()
    run, refused = list_scripts(updir)
    assert [p.name for p in run] == ["10-a", "20-b"] and refused == []


def test_environment_and_argument(updir: Path, tmp_path: Path) -> None:
    needs_root()
    out = tmp_path / "out"
    # An inheritable descriptor, like the tap fd QEMU hands its script: it must not
    # reach the custom script, or the tap would outlive the guest.
    leaked = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(leaked, True)
    try:
        write_script(updir, "10-env", f'echo "$1 $ACTION $NICHOOKS_CONTEXT $MODE" > {out}\n'
                                f'[ -e /proc/self/fd/{leaked} ] && echo "fd {leaked} leaked" >> {out}\ntrue')
        env = {"ACTION": "up", "NICHOOKS_CONTEXT": "start", "MODE": "bridged", "PATH": "/usr/bin:/bin"}
        failures = run_scripts(updir, "tap0", env, 10, HookLog(), stop_on_failure=True)
    finally:
        os.close(leaked)
    assert failures == []
    assert out.read_text().splitlines() == ["tap0 up start bridged"]


def test_failure_is_reported_with_its_last_line(updir: Path) -> None:
    needs_root()
    write_script(updir, "10-fail", "echo first; echo 'no route to nowhere' >&2; exit 3")
    write_script(updir, "20-never", "exit 0")
    [failure] = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert "exited with status 3: no route to nowhere" in failure.reason


def test_ifdown_scripts_all_run_despite_failures(updir: Path, tmp_path: Path) -> None:
    needs_root()
    write_script(updir, "10-fail", "exit 1")
    write_script(updir, "20-ok", f"touch {tmp_path / 'ran'}")
    failures = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=False)
    assert len(failures) == 1 and (tmp_path / "ran").exists()


@pytest.mark.parametrize("how,fragment", [
    ("uid", "is owned by uid 65534, not root"),
    ("group-writable", "group- or world-writable (mode 0775)"),
    ("world-writable", "group- or world-writable (mode 0757)"),
])
def test_unsafe_scripts_are_refused(updir: Path, how: str, fragment: str) -> None:
    needs_root()
    path = write_script(updir, "10-x", "true")
    if how == "uid":
        os.chown(path, 65534, 0)
    else:
        path.chmod(0o775 if how == "group-writable" else 0o757)
    [failure] = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert fragment in failure.reason and "10-x" in failure.reason


def test_world_writable_directory_is_refused(updir: Path) -> None:
    needs_root()
    write_script(updir, "10-x", "true")
    updir.chmod(0o777)
    [failure] = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert "refusing to run scripts" in failure.reason


def test_timeout_kills_the_script_and_its_children(updir: Path, tmp_path: Path) -> None:
    needs_root()
    marker, pidfile = tmp_path / "child-alive", tmp_path / "child-pid"
    # The child would outlive the script by far: it is gone only if it was killed. (Its
    # command line names the marker: the script's own is /proc/self/fd/N.)
    write_script(updir, "10-hang", f"sh -c 'sleep 120; touch {marker}' & echo $! > {pidfile}; sleep 120")
    start = time.monotonic()
    [failure] = run_scripts(updir, "tap0", {"PATH": "/usr/bin:/bin"}, 0.5, HookLog(), stop_on_failure=True)
    assert "did not finish within 0.5s" in failure.reason
    # Not a speed figure: only that we did not wait for the child (it holds the output
    # pipe for 120 s), as Ganeti would wait for ours.
    assert time.monotonic() - start < 60
    assert pidfile.exists() and pidfile.read_text().strip(), "killed before it started its child"
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 20
    while running(child, str(marker)):
        assert time.monotonic() < deadline, f"the script's child {child} is still running"
        time.sleep(0.02)
    assert not marker.exists()


def running(pid: int, name: str) -> bool:
    """Process `pid` exists, is not a zombie and has `name` in its command line (so it
    is not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and name.encode() in cmdline


def test_missing_directory_is_fine(tmp_path: Path) -> None:
    assert run_scripts(tmp_path / "nope", "tap0", {}, 1, HookLog(), stop_on_failure=True) == []


# --- symlinks and the check-then-run race ----------------------------------------------
#
# A name in ifup.d may be a symlink. Whoever can change anything on the way to its target
# (the link itself, a directory it passes through) can swap the file after the check, so
# the whole chain must be root's; and what runs must be the very file that was checked.


class RecordingLog(HookLog):
    """A HookLog that keeps events instead of sending them to syslog."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _emit(self, priority: int, event: str, kv: dict[str, Any]) -> None:
        self.events.append((event, kv))


def safe_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(exist_ok=True)
    path.chmod(mode)
    return path


def marker_script(directory: Path, name: str, marker: Path, text: str = "ran") -> Path:
    """A script that leaves `marker` behind, holding `text` and its argument."""
    return write_script(safe_dir(directory), name, f'echo "{text} $1" >> {marker}')


@pytest.mark.parametrize("how,fragment", [
    ("uid", "is owned by uid 1000, not root"),
    ("world-writable", "is group- or world-writable (mode 0777)"),
    ("group-writable", "is group- or world-writable (mode 0775)"),
    ("sticky", "is group- or world-writable (mode 1777)"),
])
def test_symlink_into_an_unsafe_directory_is_refused_and_never_runs(
        updir: Path, tmp_path: Path, how: str, fragment: str) -> None:
    needs_root()
    marker = tmp_path / "ran"
    elsewhere = tmp_path / "elsewhere"
    marker_script(elsewhere, "x", marker)  # the file itself is root's and 0755
    if how == "uid":
        os.chown(elsewhere, 1000, 1000)
    else:
        elsewhere.chmod({"world-writable": 0o777, "group-writable": 0o775, "sticky": 0o1777}[how])
    (updir / "10-link").symlink_to("../elsewhere/x")
    log = RecordingLog()
    failures = run_scripts(updir, "tap0", {}, 10, log, stop_on_failure=True)
    assert not marker.exists()  # the target never ran
    [failure] = failures
    assert "10-link" in failure.reason and f"{elsewhere} {fragment}" in failure.reason
    assert [e for e, kv in log.events] == ["custom-script-refused"]
    run, refused = list_scripts(updir)
    assert run == [] and [r.script.name for r in refused] == ["10-link"]


def test_unsafe_directory_behind_an_intermediate_link_is_refused(updir: Path, tmp_path: Path) -> None:
    needs_root()
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    marker_script(evil, "x", marker)
    os.chown(evil, 1000, 1000)
    hop = safe_dir(tmp_path / "lib") / "hop"
    hop.symlink_to("../evil/x")
    (updir / "10-link").symlink_to("../lib/hop")
    failures = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=False)
    assert not marker.exists()  # the target never ran
    [failure] = failures
    assert f"{evil} is owned by uid 1000, not root" in failure.reason and "10-link" in failure.reason


def test_symlink_owned_by_someone_else_is_refused(updir: Path, tmp_path: Path) -> None:
    needs_root()
    marker = tmp_path / "ran"
    lib = tmp_path / "lib"
    marker_script(lib, "x", marker)
    hop = lib / "hop"
    hop.symlink_to("x")
    os.lchown(hop, 1000, 1000)
    (updir / "10-link").symlink_to("../lib/hop")
    failures = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert not marker.exists()  # the target never ran
    [failure] = failures
    assert f"{hop} is a symlink owned by uid 1000, not root" in failure.reason


def test_absolute_symlink_through_a_sticky_directory_is_refused(updir: Path, tmp_path: Path) -> None:
    """/tmp-like directories are refused too: anyone can create the entry the link names
    once the administrator's file is gone, sticky bit or not."""
    needs_root()
    marker = tmp_path / "ran"
    shared = tmp_path / "shared"
    marker_script(shared, "x", marker)
    shared.chmod(0o1777)
    (updir / "10-link").symlink_to(shared / "x")  # absolute: walked from /
    failures = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert not marker.exists()  # the target never ran
    [failure] = failures
    assert "group- or world-writable (mode 1777)" in failure.reason and "10-link" in failure.reason


def test_scripts_directory_symlinked_into_a_user_directory_is_refused(tmp_path: Path) -> None:
    needs_root()
    marker = tmp_path / "ran"
    home = safe_dir(tmp_path / "home")
    marker_script(home / "scripts", "10-x", marker)
    os.chown(home, 1000, 1000)  # its owner could swap "scripts" for anything
    (tmp_path / "ifup.d").symlink_to("home/scripts")
    failures = run_scripts(tmp_path / "ifup.d", "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert not marker.exists()  # the target never ran
    [failure] = failures
    assert f"refusing to run scripts: {home} is owned by uid 1000, not root" in failure.reason


def test_root_owned_relative_chain_still_runs(updir: Path, tmp_path: Path) -> None:
    needs_root()
    marker = tmp_path / "ran"
    lib = tmp_path / "lib"
    marker_script(lib, "x", marker)
    (lib / "hop").symlink_to("x")
    (updir / "10-link").symlink_to("../lib/hop")
    (tmp_path / "scripts").symlink_to("ifup.d")  # and the scripts directory through a link
    run, refused = list_scripts(tmp_path / "scripts")
    assert [p.name for p in run] == ["10-link"] and refused == []
    assert run_scripts(tmp_path / "scripts", "tap0", {}, 10, HookLog(), stop_on_failure=True) == []
    assert marker.read_text() == "ran tap0\n"


def test_root_owned_absolute_chain_still_runs(updir: Path) -> None:
    """A binary, not a script, through an absolute link (and /bin -> usr/bin on a merged
    /usr system): it runs from its descriptor and gets the tap as its argument."""
    needs_root()
    echo = Path("/bin/echo")
    if not echo.exists():
        pytest.skip("no /bin/echo")
    (updir / "10-echo").symlink_to(echo)
    log = RecordingLog()
    assert run_scripts(updir, "tap0", {}, 10, log, stop_on_failure=True) == []
    assert [(e, kv["result"], kv["output"]) for e, kv in log.events] == [("custom-script", "ok", "tap0")]


def test_dangling_links_and_loops_are_skipped_as_before(updir: Path) -> None:
    needs_root()
    (updir / "10-dangling").symlink_to("../nowhere/x")
    (updir / "20-loop").symlink_to("20-loop")
    (updir / "30-dir").symlink_to("..")
    write_script(updir, "40-ok", "true")
    run, refused = list_scripts(updir)
    assert [p.name for p in run] == ["40-ok"] and refused == []


@pytest.mark.parametrize("via_link", [False, True])
def test_file_swapped_after_the_check_is_not_what_runs(
        updir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via_link: bool) -> None:
    """Between the check and the exec, the file is replaced by one that would have been
    refused (another user's, world-writable): the checked content runs, never that."""
    needs_root()
    marker = tmp_path / "ran"
    if via_link:
        target = marker_script(tmp_path / "lib", "x", marker, "checked")
        (updir / "10-x").symlink_to("../lib/x")
    else:
        target = marker_script(updir, "10-x", marker, "checked")
    evil = target.with_name(".swap")
    evil.write_text(f"#!/bin/sh\necho \"attacker $1\" >> {marker}\n")
    os.chown(evil, 1000, 1000)
    evil.chmod(0o777)
    real_popen = subprocess.Popen
    swapped: list[Path] = []

    def swap_then_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        os.replace(evil, target)
        swapped.append(target)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", swap_then_popen)
    failures = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert swapped == [target]  # the swap did happen before the exec
    assert "attacker" not in (marker.read_text() if marker.exists() else "")
    assert failures == [] and marker.read_text() == "checked tap0\n"

