"""The state directory and the settings file are trusted only when root alone can
write them: otherwise every hook refuses with one line naming the path and the fix,
and changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nichooks.engine.store import Store
from tests.integration.bridged_env import Site
from tests.support.hooks import one_line
from tests.support.state import journals


@pytest.fixture
def plugged_site(site: Site) -> Site:
    site.add_bridge("br0")
    site.add_tap()
    return site


@pytest.mark.parametrize("sub", ["", "nics", "taps", "locks"])
@pytest.mark.parametrize("how", ["mode", "owner"])
def test_state_directory_writable_by_others_is_refused(plugged_site: Site, sub: str,
                                                       how: str) -> None:
    site = plugged_site
    Store(site.state).ensure()
    bad = site.state / sub if sub else site.state
    if how == "mode":
        bad.chmod(0o777)
    else:
        os.chown(bad, 1000, 1000)
    before = site.host.snapshot()
    for hook in ("kvm-ifup", "kvm-ifdown"):
        r = site.hook(hook)
        assert r.returncode == 1, (hook, r.stderr)
        line = one_line(r.stderr)
        assert str(bad) in line and "chmod go-w" in line and "chown root" in line
        assert ("0777" if how == "mode" else "uid 1000") in line
    assert site.host.snapshot() == before
    assert journals(site.state) == []


def test_settings_file_writable_by_others_is_refused(plugged_site: Site) -> None:
    site = plugged_site
    conf = site.conf / "nichooks.conf"
    conf.write_text("[nichooks]\nNICHOOKS_OVS_ANTISPOOF = off\n")
    before = site.host.snapshot()
    for make_bad, expect in ((lambda: conf.chmod(0o666), "0666"),
                             (lambda: os.chown(conf, 1000, 0), "uid 1000"),
                             (lambda: site.conf.chmod(0o777), "0777")):
        conf.chmod(0o644)
        os.chown(conf, 0, 0)
        site.conf.chmod(0o755)
        make_bad()
        r = site.hook("kvm-ifup")
        assert r.returncode == 1, r.stderr
        line = one_line(r.stderr)
        assert "settings file" in line and expect in line and "chmod go-w" in line
        assert site.host.snapshot() == before
    conf.chmod(0o644)
    os.chown(conf, 0, 0)
    site.conf.chmod(0o755)
    r = site.hook("kvm-ifup")
    assert r.returncode == 0, r.stderr
    assert site.hook("kvm-ifdown").returncode == 0


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_state_directories_are_made_0755_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        store = Store(tmp_path / "run" / "nichooks")
        store.ensure()
    finally:
        os.umask(old)
    for d in (store.root, store.nics, store.taps, store.tmp, store.locks):
        assert d.stat().st_mode & 0o7777 == 0o755, d
