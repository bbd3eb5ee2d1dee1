"""install / uninstall into a temporary root, for every Ganeti layout and Xen; the
settings report; instance-communication taps left to Ganeti."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nichooks.cli import main
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


# --- hardening (security issue, item 6) ---------------------------------------------

STAND_IN = "#!/bin/sh\nprintf 'entry:%s\\n' \"$NICHOOKS_WRAPPED\" \"$@\"\n"
BACKUP = ".nichooks-backup"
MANIFEST = "var/lib/nichooks/installed.json"


def stand_in_bin(directory: Path) -> Path:
    """Harmless entry points: each prints what the wrapper set and passed, one per line."""
    directory.mkdir(parents=True)
    for name in ("kvm-ifup", "kvm-ifdown", "vif-ganeti"):
        (directory / name).write_text(STAND_IN)
        (directory / name).chmod(0o755)
    return directory


def snapshot(top: Path) -> dict[str, tuple[int, str]]:
    """Every path under `top` with its mode and content (or link target)."""
    out = {}
    for p in sorted(top.rglob("*")):
        st = p.lstat()
        body = os.readlink(p) if p.is_symlink() else p.read_text() if p.is_file() else ""
        out[str(p.relative_to(top))] = (st.st_mode, body)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("bin_name", "xen_path"), [
    ("bin", "/etc/xen/scripts/vif-custom;echo X"),
    ("bin", "/etc/xen/scripts/$(echo X)"),
    ("bin", "/etc/xen/scripts/`echo X`"),
    ("bin", "/etc/xen/scripts/it's \"a\" \\n \\\\c"),
    ("b in;echo X $(echo X)`echo X`'", "/etc/xen/scripts/vif-custom"),
])
def test_every_value_in_a_wrapper_is_quoted(tmp_path: Path, bin_name: str, xen_path: str) -> None:
    """Run by sh, the wrapper passes the path and arguments through as data and runs
    nothing else, both on the normal path and on the loop guard's."""
    root = tmp_path / "root"
    installer = Installer(root, stand_in_bin(tmp_path / bin_name))
    assert installer.install(installer.targets(False, True, xen_path), force=False).kept == 0
    script = root / xen_path.lstrip("/")
    env = {"PATH": "/usr/bin:/bin"}
    r = subprocess.run(["sh", str(script), "a", "b c", "$(echo X)"], capture_output=True, text=True,
                       env=env, timeout=10, check=False)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"entry:{xen_path}\nentry:a\nentry:b c\nentry:$(echo X)\n"

    r = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=10, check=False,
                       env={**env, "NICHOOKS_WRAPPED": "outer \\n $(echo X)"})
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"nichooks: {xen_path} was called again from within outer \\n $(echo X): "
                        "refusing to loop\n")


def test_a_xen_path_outside_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "a/root"
    r = cli("install", "--xen", "--xen-path", "/../../escaped", "--root", str(root))
    assert r.returncode == 2
    assert r.stderr.startswith("nichooks: --xen-path: '/../../escaped' contains '..'")
    assert not (tmp_path / "escaped").exists()
    assert not root.exists()


@pytest.mark.parametrize("how", ["missing", "not executable", "a directory"])
def test_install_refuses_an_entry_point_it_cannot_exec(tmp_path: Path, how: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """One line, exit 1 like the module's other refusals, and nothing written or moved,
    not even a foreign file that --force would otherwise move aside."""
    bin_dir = stand_in_bin(tmp_path / "bin")
    entry = bin_dir / "vif-ganeti"
    if how == "missing":
        entry.unlink()
    elif how == "not executable":
        entry.chmod(0o644)
    else:
        entry.unlink()
        entry.mkdir()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    root = tmp_path / "root"
    foreign = root / "etc/xen/scripts/vif-custom"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("#!/bin/sh\n# the operator's\n")
    before = snapshot(root)

    status = main(["install", "--force", "--root", str(root)])
    assert snapshot(root) == before
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1
    assert err.startswith(f"nichooks: entry point {entry} ")


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_modes_are_explicit_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    bin_dir = stand_in_bin(tmp_path / "bin")
    root = tmp_path / "root"
    installer = Installer(root, bin_dir)
    old = os.umask(umask)
    try:
        installer.install(installer.targets(True, True, None), force=False)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in [root, *root.rglob("*")]}
    assert "root/etc/ganeti/network/routed" in modes
    assert modes == {p: 0o644 if p == f"root/{MANIFEST}" else 0o755 for p in modes}


def _victims(tmp_path: Path) -> list[Path]:
    out = [tmp_path / "outside/victim", tmp_path / "outside/kvm-ifup-custom.nichooks-backup",
           tmp_path / "root/etc/passwd"]
    for v in out:
        v.parent.mkdir(parents=True, exist_ok=True)
        v.write_text(f"precious {v.name}\n")
    return out


CRAFTED: dict[str, Callable[[Path], tuple[str, str | None]]] = {
    # name: (tmp_path) -> (manifest key, backup); a key naming a victim gets its digest
    "key with ..": lambda t: ("../outside/victim", None),
    "absolute key": lambda t: (str(t / "outside/victim"), None),
    "key through a symlinked directory": lambda t: ("etc/ganeti/link/victim", None),
    "backup outside the root": lambda t: ("etc/ganeti/kvm-ifup-custom", str(t / "outside/victim")),
    "backup through ..": lambda t: ("etc/ganeti/kvm-ifup-custom",
                                    str(t / "root/etc/ganeti/../../../outside/kvm-ifup-custom") + BACKUP),
    "backup not its own, inside the root": lambda t: ("etc/ganeti/kvm-ifup-custom",
                                                      str(t / "root/etc/passwd")),
    "relative backup": lambda t: ("etc/ganeti/kvm-ifup-custom", "etc/passwd"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_manifest_naming_paths_outside_the_root_is_refused(tmp_path: Path, case: str) -> None:
    """Uninstall (and install) refuse with one line naming the entry; nothing changes:
    not the files it names, not our wrappers, not the manifest."""
    root = tmp_path / "root"
    assert cli("install", "--ganeti", "--root", str(root)).returncode == 0
    victims = _victims(tmp_path)
    (root / "etc/ganeti/link").symlink_to(tmp_path / "outside")
    (root / "etc/ganeti/kvm-ifup-custom").unlink()  # so an old uninstall would "restore" over it
    key, backup = CRAFTED[case](tmp_path)
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][key] = {"caller": "ganeti", "entry": "/bin/true", "backup": backup,
                              "sha256": sha(tmp_path / "outside/victim")}
    if backup:
        manifest["files"][key]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    before = snapshot(tmp_path)

    for verb in ("uninstall", "install"):
        r = cli(verb, "--ganeti", "--root", str(root))
        assert all(v.read_text() == f"precious {v.name}\n" for v in victims if v.exists())
        assert all(v.exists() for v in victims), (verb, r.stdout)
        assert snapshot(tmp_path) == before
        assert r.returncode == 2, (verb, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1
        assert r.stderr.startswith(f"nichooks: {manifest_path}: entry {key!r}: ")


def test_uninstall_removes_only_our_wrappers_whatever_digest_the_manifest_gives(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert cli("install", "--ganeti", "--root", str(root)).returncode == 0
    passwd = root / "etc/passwd"
    passwd.write_text("root:x:0:0::/root:/bin/sh\n")
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"]["etc/passwd"] = {"caller": "ganeti", "entry": "/bin/true", "backup": None,
                                       "sha256": sha(passwd)}
    (root / MANIFEST).write_text(json.dumps(manifest))
    r = cli("uninstall", "--root", str(root))
    assert passwd.exists()
    assert passwd.read_text() == "root:x:0:0::/root:/bin/sh\n"
    assert r.returncode == 1
    assert f"kept {passwd}" in r.stdout
    assert not (root / "etc/ganeti/kvm-vif-bridge").exists()


def test_force_never_overwrites_the_backup_of_an_earlier_force(tmp_path: Path) -> None:
    target = tmp_path / "etc/ganeti/kvm-vif-bridge"
    backup = Path(str(target) + BACKUP)
    target.parent.mkdir(parents=True)
    target.write_text("original\n")
    assert cli("install", "--ganeti", "--force", "--root", str(tmp_path)).returncode == 0
    assert backup.read_text() == "original\n"
    target.write_text("the operator's second script\n")

    r = cli("install", "--ganeti", "--force", "--root", str(tmp_path))
    assert backup.read_text() == "original\n"
    assert target.read_text() == "the operator's second script\n"
    assert r.returncode == 1
    assert f"kept {target}: not made by nichooks, and {backup} already exists" in r.stdout

    target.unlink()  # the operator decides; the original is still restorable
    assert cli("uninstall", "--ganeti", "--root", str(tmp_path)).returncode == 0
    assert target.read_text() == "original\n"
    assert not backup.exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_force_never_overwrites_a_backup_it_did_not_make(tmp_path: Path, dry_run: bool) -> None:
    target = tmp_path / "etc/ganeti/kvm-vif-bridge"
    backup = Path(str(target) + BACKUP)
    target.parent.mkdir(parents=True)
    target.write_text("current\n")
    backup.write_text("the operator's own backup\n")
    r = cli("install", "--ganeti", "--force", "--root", str(tmp_path), *(["--dry-run"] * dry_run))
    assert (target.read_text(), backup.read_text()) == ("current\n", "the operator's own backup\n")
    assert r.returncode == 1
    assert f"kept {target}: not made by nichooks, and {backup} already exists" in r.stdout


@pytest.mark.parametrize("change", ["edited", "replaced by a dangling symlink"])
def test_a_kept_wrapper_keeps_its_backup_record(tmp_path: Path, change: str) -> None:
    """Uninstall keeps a changed wrapper and its backup record, so the original can
    still be restored once the operator removes the changed file."""
    target = tmp_path / "etc/ganeti/kvm-vif-bridge"
    backup = Path(str(target) + BACKUP)
    target.parent.mkdir(parents=True)
    target.write_text("original\n")
    assert cli("install", "--ganeti", "--force", "--root", str(tmp_path)).returncode == 0
    if change == "edited":
        target.write_text(target.read_text() + "# local change\n")
    else:
        target.unlink()
        target.symlink_to(tmp_path / "nowhere")

    r = cli("uninstall", "--ganeti", "--root", str(tmp_path))
    assert r.returncode == 1
    assert f"kept {target}" in r.stdout
    assert target.is_symlink() == (change != "edited")
    assert backup.read_text() == "original\n"
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert list(files) == ["etc/ganeti/kvm-vif-bridge"]
    assert files["etc/ganeti/kvm-vif-bridge"]["backup"] == str(backup)

    target.unlink()
    assert cli("uninstall", "--ganeti", "--root", str(tmp_path)).returncode == 0
    assert target.read_text() == "original\n"
    assert not backup.exists()
    assert json.loads((tmp_path / MANIFEST).read_text())["files"] == {}
