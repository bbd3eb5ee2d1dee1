"""The ifdown scripts run once per plug, whoever tears it down: a sweep that found the
device gone, or kvm-ifdown; a later kvm-ifdown says it found nothing and runs none."""

from __future__ import annotations

from tests.integration.bridged_env import Site
from tests.support.hooks import bin_path
from tests.support.scripts import write_script
from tests.support.state import journals


def record_script(site: Site) -> None:
    write_script(site.conf / "ifdown.d", "10-record",
                 f'echo "$NICHOOKS_CONTEXT $1 $INSTANCE" >> {site.conf}/ran')


def ran(site: Site) -> list[str]:
    path = site.conf / "ran"
    return path.read_text().splitlines() if path.exists() else []


def test_ifdown_after_a_sweep_undid_the_vanished_tap_runs_no_scripts(site: Site) -> None:
    site.add_bridge("br0")
    site.add_tap()
    record_script(site)
    assert site.hook("kvm-ifup").returncode == 0
    site.host.ip("link", "del", "tap0")
    r = site.host.run(bin_path("nichooks"), "sweep", env=site.env(), check=False)
    assert r.returncode == 0, r.stderr
    assert ran(site) == ["vanished tap0 inst1.example.org"]
    assert journals(site.state) == []
    r = site.hook("kvm-ifdown", "-v", "tap0")
    assert r.returncode == 0, r.stderr
    assert "already torn down" in r.stderr
    assert ran(site) == ["vanished tap0 inst1.example.org"]


def test_a_second_ifdown_runs_no_scripts(site: Site) -> None:
    site.add_bridge("br0")
    site.add_tap()
    record_script(site)
    assert site.hook("kvm-ifup").returncode == 0
    assert site.hook("kvm-ifdown", "tap0").returncode == 0
    assert ran(site) == ["shutdown tap0 inst1.example.org"]
    assert site.hook("kvm-ifdown", "tap0").returncode == 0
    assert ran(site) == ["shutdown tap0 inst1.example.org"]
