"""install / uninstall into a temporary root, for every Ganeti layout and Xen; the
settings report; instance-communication taps left to Ganeti."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nichooks.entry import kvm_ifdown, kvm_ifup
from nichooks.install import GANETI_TARGETS, Installer

NICHOOKS = str(Path(sys.executable).parent / "nichooks")
GANETI_PATHS = ["etc/ganeti/kvm-vif-bridge", "etc/ganeti/kvm-ifup-custom",
                "etc/ganeti/kvm-ifdown-custom"] + [
    f"etc/ganeti/network/{m}/{a}" for m in ("bridged", "openvswitch", "routed") for a in ("up", "down")]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NICHOOKS, *args], capture_output=True, text=True, env=env, check=False)


def test_install_ganeti_puts_a_wrapper_everywhere_ganeti_looks(tmp_path: Path) -> None:
    r = cli("install", "--ganeti", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(rel for _c, rel, _e in GANETI_TARGETS) == sorted(GANETI_PATHS)
    for rel in GANETI_PATHS:
        path = tmp_path / rel
        assert os.access(path, os.X_OK)
        entry = "kvm-ifdown" if rel.endswith(("down", "ifdown-custom")) else "kvm-ifup"
        assert f"exec {Path(sys.executable).parent / entry} \"$@\"" in path.read_text()
    assert not (tmp_path / "etc/xen").exists()
    manifest = json.loads((tmp_path / "var/lib/nichooks/installed.json").read_text())
    assert sorted(manifest["files"]) == sorted(GANETI_PATHS)

    r = cli("uninstall", "--ganeti", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "etc/ganeti/network").exists()  # the per-mode dirs it made
    assert [p for p in (tmp_path / "etc").rglob("*") if p.is_file()] == []


def test_xen_at_the_default_or_given_path(tmp_path: Path) -> None:
    assert cli("install", "--xen", "--root", str(tmp_path)).returncode == 0
    text = (tmp_path / "etc/xen/scripts/vif-custom").read_text()
    assert f"exec {Path(sys.executable).parent / 'vif-ganeti'} \"$@\"" in text
    assert cli("install", "--xen", "--xen-path", "/usr/lib/xen/scripts/vif-x",
               "--root", str(tmp_path)).returncode == 0
    assert (tmp_path / "usr/lib/xen/scripts/vif-x").exists()
    assert cli("uninstall", "--xen", "--root", str(tmp_path)).returncode == 0
    assert not (tmp_path / "etc/xen/scripts/vif-custom").exists()
    assert not (tmp_path / "usr/lib/xen/scripts/vif-x").exists()


def test_a_foreign_file_is_kept_unless_forced_and_restored_on_uninstall(tmp_path: Path) -> None:
    foreign = tmp_path / "etc/ganeti/kvm-vif-bridge"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("#!/bin/sh\n# snf-network's\n")
    r = cli("install", "--ganeti", "--root", str(tmp_path))
    assert r.returncode == 1
    assert f"kept {foreign}" in r.stdout
    assert foreign.read_text() == "#!/bin/sh\n# snf-network's\n"
    assert (tmp_path / "etc/ganeti/kvm-ifup-custom").exists()  # the rest was installed

    r = cli("install", "--ganeti", "--force", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "NICHOOKS_WRAPPED" in foreign.read_text()
    assert Path(str(foreign) + ".nichooks-backup").read_text().endswith("snf-network's\n")

    r = cli("uninstall", "--ganeti", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert foreign.read_text() == "#!/bin/sh\n# snf-network's\n"
    assert not Path(str(foreign) + ".nichooks-backup").exists()


def test_uninstall_keeps_a_file_changed_since(tmp_path: Path) -> None:
    assert cli("install", "--ganeti", "--root", str(tmp_path)).returncode == 0
    edited = tmp_path / "etc/ganeti/kvm-ifup-custom"
    edited.write_text(edited.read_text() + "# local change\n")
    r = cli("uninstall", "--root", str(tmp_path))
    assert r.returncode == 1
    assert edited.exists() and "local change" in edited.read_text()
    assert not (tmp_path / "etc/ganeti/kvm-vif-bridge").exists()


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    r = cli("install", "--dry-run", "--root", str(tmp_path))
    assert r.returncode == 0
    assert "would install" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_recursion_guard_stops_a_loop(tmp_path: Path) -> None:
    """Our wrapper as kvm-vif-bridge; an "entry point" that execs Ganeti's stock
    kvm-ifup, which execs kvm-vif-bridge again: it must stop, not loop."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    root = tmp_path / "root"
    stock = tmp_path / "stock-kvm-ifup"
    stock.write_text(f"#!/bin/sh\nexec {root}/etc/ganeti/kvm-vif-bridge\n")
    stock.chmod(0o755)
    entry = bin_dir / "kvm-ifup"
    entry.write_text(f"#!/bin/sh\nexec {stock}\n")
    entry.chmod(0o755)
    Installer(root, bin_dir).install(GANETI_TARGETS[:1], force=False)
    r = subprocess.run([str(root / "etc/ganeti/kvm-vif-bridge")], capture_output=True, text=True,
                       timeout=10, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert "refusing to loop" in r.stderr


def test_installing_onto_our_own_entry_point_is_skipped(tmp_path: Path) -> None:
    bin_dir = tmp_path / "etc/ganeti"
    bin_dir.mkdir(parents=True)
    (bin_dir / "kvm-ifup").write_text("ours")
    report = Installer(tmp_path, bin_dir).install([("ganeti", "etc/ganeti/kvm-ifup", "kvm-ifup")],
                                                 force=True)
    assert (bin_dir / "kvm-ifup").read_text() == "ours"
    assert "our own entry point" in report.lines[0]


@pytest.mark.parametrize("hook", [kvm_ifup, kvm_ifdown])
def test_instance_communication_taps_are_left_to_ganeti(hook: object, tmp_path: Path) -> None:
    env = {"INTERFACE": "gnt.com.0", "MODE": "routed", "MAC": "aa:00:00:00:00:01",
           "IP": "10.0.0.1", "INSTANCE": "i", "NICHOOKS_STATE_DIR": str(tmp_path / "state")}
    assert hook(["kvm-hook"], env) == 0  # type: ignore[operator]
    assert not (tmp_path / "state").exists()


def test_config_says_where_each_setting_came_from(tmp_path: Path) -> None:
    (tmp_path / "nichooks.conf").write_text("[nichooks]\nNICHOOKS_LOCK_TIMEOUT = 12\n"
                                            "nichooks_ovs_timeout = 3\n")
    env = {"PATH": "/usr/bin:/bin", "NICHOOKS_CONF_DIR": str(tmp_path), "NICHOOKS_OVS_TIMEOUT": "4"}
    r = cli("config", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["NICHOOKS_LOCK_TIMEOUT"]["value"] == "12"
    assert rows["NICHOOKS_LOCK_TIMEOUT"]["source"] == f"file {tmp_path}/nichooks.conf"
    assert (rows["NICHOOKS_OVS_TIMEOUT"]["value"], rows["NICHOOKS_OVS_TIMEOUT"]["source"]) == ("4", "env")
    assert rows["NICHOOKS_RULE_PRIORITY"] == {"name": "NICHOOKS_RULE_PRIORITY", "value": "20000",
                                              "source": "default"}
    assert cli("config", env=env).stdout.count("\n") == len(rows) + 1


def test_the_example_settings_file_names_every_setting_with_its_default() -> None:
    from nichooks.settings import DEFAULTS

    text = (Path(__file__).parents[2] / "share/nichooks.conf").read_text()
    for name, default in DEFAULTS.items():
        if name == "NICHOOKS_CONF_DIR":
            assert name in text
            continue
        assert f"# {name} = {default}".rstrip() + "\n" in text, name
