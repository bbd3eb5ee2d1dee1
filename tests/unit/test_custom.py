"""Custom scripts: order, environment, refusals, failures, timeouts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nichooks.custom import list_scripts, run_scripts
from nichooks.log import HookLog


def script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    directory.mkdir(exist_ok=True, mode=0o755)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


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
        script(updir, name, "true")
    script(updir, "15-not-executable", "true", mode=0o644)
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
        script(updir, "10-env", f'echo "$1 $ACTION $NICHOOKS_CONTEXT $MODE" > {out}\n'
                                f'[ -e /proc/self/fd/{leaked} ] && echo "fd {leaked} leaked" >> {out}\ntrue')
        env = {"ACTION": "up", "NICHOOKS_CONTEXT": "start", "MODE": "bridged", "PATH": "/usr/bin:/bin"}
        failures = run_scripts(updir, "tap0", env, 10, HookLog(), stop_on_failure=True)
    finally:
        os.close(leaked)
    assert failures == []
    assert out.read_text().splitlines() == ["tap0 up start bridged"]


def test_failure_is_reported_with_its_last_line(updir: Path) -> None:
    needs_root()
    script(updir, "10-fail", "echo first; echo 'no route to nowhere' >&2; exit 3")
    script(updir, "20-never", "exit 0")
    [failure] = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert "exited with status 3: no route to nowhere" in failure.reason


def test_ifdown_scripts_all_run_despite_failures(updir: Path, tmp_path: Path) -> None:
    needs_root()
    script(updir, "10-fail", "exit 1")
    script(updir, "20-ok", f"touch {tmp_path / 'ran'}")
    failures = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=False)
    assert len(failures) == 1 and (tmp_path / "ran").exists()


@pytest.mark.parametrize("how,fragment", [
    ("uid", "is owned by uid 65534, not root"),
    ("group-writable", "group- or world-writable (mode 0775)"),
    ("world-writable", "group- or world-writable (mode 0757)"),
])
def test_unsafe_scripts_are_refused(updir: Path, how: str, fragment: str) -> None:
    needs_root()
    path = script(updir, "10-x", "true")
    if how == "uid":
        os.chown(path, 65534, 0)
    else:
        path.chmod(0o775 if how == "group-writable" else 0o757)
    [failure] = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert fragment in failure.reason and "10-x" in failure.reason


def test_world_writable_directory_is_refused(updir: Path) -> None:
    needs_root()
    script(updir, "10-x", "true")
    updir.chmod(0o777)
    [failure] = run_scripts(updir, "tap0", {}, 10, HookLog(), stop_on_failure=True)
    assert "refusing to run scripts" in failure.reason


def test_timeout_kills_the_script_and_its_children(updir: Path, tmp_path: Path) -> None:
    needs_root()
    marker = tmp_path / "child-alive"
    script(updir, "10-hang", f"(sleep 3; touch {marker}) & sleep 30")
    start = time.monotonic()
    [failure] = run_scripts(updir, "tap0", {"PATH": "/usr/bin:/bin"}, 0.5, HookLog(), stop_on_failure=True)
    assert "did not finish within 0.5s" in failure.reason
    assert time.monotonic() - start < 5
    time.sleep(3.5)
    assert not marker.exists()


def test_missing_directory_is_fine(tmp_path: Path) -> None:
    assert run_scripts(tmp_path / "nope", "tap0", {}, 1, HookLog(), stop_on_failure=True) == []
