"""A private Open vSwitch inside a test's host namespace, and guests plugged into it.

ovsdb-server and ovs-vswitchd run with their own run/db/log directory. ovs-vswitchd
runs *inside* the host namespace: with the userspace (netdev) datapath it opens the
ports' devices and creates its own taps in the namespace it runs in, so nothing
appears in the machine's root namespace. Both are stopped by pid.

Everything a test observes goes through ovs-vsctl / ovs-ofctl / ovs-appctl, never
through nichooks' own OVSDB code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import packets as pk
from tests.support.frames import CONTROL_ETHERTYPE, Listener, new_token
from tests.support.frames import SCRIPT as FRAMES
from tests.support.hooks import bin_path, hook_env, wait_for
from tests.support.netns import Netns

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


@dataclass
class Guest:
    """A guest: its own namespace, a NIC `eth0` whose peer in the host namespace is
    the "tap" nichooks plugs."""

    ns: Netns
    tap: str
    mac: str
    ip4: str | None
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def run(self, *argv: str, check: bool = False, timeout: float = 30
            ) -> subprocess.CompletedProcess[str]:
        return self.ns.run(*argv, check=check, timeout=timeout)

    def ping(self, addr: str, count: int = 1, wait: float = 1.0) -> bool:
        return self.run("ping", "-n", "-c", str(count), "-W", str(wait), addr).returncode == 0

    def ping_until(self, addr: str, tries: int = 5) -> bool:
        """The first ping through a fresh port may be lost while ARP and the switch's
        MAC learning settle."""
        return any(self.ping(addr) for _ in range(tries))

    def listen(self) -> Listener:
        """A capture of the frames the guest's eth0 receives, bound before it returns,
        so before any traffic the test makes. `until(token)` gives what arrived before a
        control frame: pass the token of one sent after the frames under test (see
        `send_control`), and "not among them" means never delivered, however slow the
        machine is. `wait(...)` polls for frames that must arrive."""
        return Listener(self.ns.name, "eth0")


def add_guest(host: Netns, tap: str, mac: str, ip4: str | None = None,
              ip6: str | None = None) -> Guest:
    """A guest in a namespace of its own, its `eth0` (MAC `mac`, addresses with their
    prefix length, IPv6 without DAD) joined by a veth pair to `tap` in `host`, both up
    on the guest's side. The caller deletes `guest.ns`."""
    ns = Netns()
    try:
        host.ip("link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        ns.ip("link", "set", "eth0", "address", mac)
        if ip4:
            ns.ip("addr", "add", ip4, "dev", "eth0")
        if ip6:
            ns.ip("addr", "add", ip6, "dev", "eth0", "nodad")
        ns.ip("link", "set", "eth0", "up")
    except BaseException:
        ns.delete()
        raise
    return Guest(ns=ns, tap=tap, mac=mac, ip4=ip4.split("/")[0] if ip4 else None)


class Switch:
    def __init__(self, host: Netns, root: Path) -> None:
        self.host = host
        self.dir = root / "ovs"
        self.dir.mkdir(parents=True)
        self.db = f"unix:{self.dir / 'db.sock'}"
        self.guests: list[Guest] = []

    # -- daemons ---------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        d = str(self.dir)
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OVS_RUNDIR": d, "OVS_DBDIR": d,
                "OVS_LOGDIR": d, "OVS_SYSCONFDIR": d}

    def start(self) -> None:
        d = self.dir
        subprocess.run(["ovsdb-tool", "create", str(d / "conf.db"), str(SCHEMA)], check=True,
                       env=self.env())
        subprocess.run(["ovsdb-server", str(d / "conf.db"), f"--remote=p{self.db}",
                        f"--pidfile={d / 'ovsdb-server.pid'}", f"--unixctl={d / 'ovsdb-server.ctl'}",
                        f"--log-file={d / 'ovsdb-server.log'}", "--detach"],
                       check=True, env=self.env(), capture_output=True)
        self.vsctl("--no-wait", "init")
        self.start_vswitchd()

    def start_vswitchd(self) -> None:
        d = self.dir
        self.host.run("ovs-vswitchd", self.db, f"--pidfile={d / 'ovs-vswitchd.pid'}",
                      f"--unixctl={d / 'ovs-vswitchd.ctl'}", f"--log-file={d / 'ovs-vswitchd.log'}",
                      "--detach", env=self.env())
        wait_for("ovs-vswitchd to start", lambda: (d / "ovs-vswitchd.ctl").exists(), timeout=10)

    def restart_vswitchd(self) -> None:
        """What a package upgrade or a crash does: the datapath and every flow go, the
        database (ports and all) stays."""
        _kill(int((self.dir / "ovs-vswitchd.pid").read_text().strip()))
        wait_for("ovs-vswitchd to stop", lambda: not (self.dir / "ovs-vswitchd.ctl").exists())
        self.start_vswitchd()

    def stop(self) -> None:
        for name in ("ovs-vswitchd", "ovsdb-server"):
            pidfile = self.dir / f"{name}.pid"
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            _kill(pid)

    def __enter__(self) -> Switch:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observing (never through nichooks' code) -------------------------------------
    def vsctl(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(["ovs-vsctl", f"--db={self.db}", "--timeout=10", *args],
                           capture_output=True, text=True, env=self.env())
        if check and r.returncode != 0:
            raise AssertionError(f"ovs-vsctl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def ofctl(self, *args: str) -> str:
        return subprocess.run(["ovs-ofctl", *args], capture_output=True, text=True, check=True,
                              env=self.env()).stdout

    def appctl(self, *args: str) -> str:
        return subprocess.run(["ovs-appctl", "-t", str(self.dir / "ovs-vswitchd.ctl"), *args],
                              capture_output=True, text=True, check=True).stdout

    def row(self, table: str, name: str, *columns: str) -> dict[str, Any]:
        """Columns of one row as JSON values (OVSDB's ["set", ...] / ["map", ...])."""
        out = self.vsctl("--format=json", f"--columns={','.join(columns)}", "list", table, name)
        data = json.loads(out)
        return dict(zip(data["headings"], (_plain(v) for v in data["data"][0]), strict=True))

    def ports(self, bridge: str) -> set[str]:
        return set(self.vsctl("list-ports", bridge).split())

    def flows(self, bridge: str, match: str = "") -> list[str]:
        mgmt = f"unix:{self.dir / (bridge + '.mgmt')}"
        out = self.ofctl("--no-stats", "dump-flows", mgmt, *([match] if match else []))
        return [line.strip() for line in out.splitlines() if "actions=" in line]

    def our_flows(self, bridge: str) -> list[str]:
        """Every flow carrying the nichooks cookie prefix."""
        return self.flows(bridge, "cookie=0x4e48000000000000/0xffff000000000000")

    # -- building ----------------------------------------------------------------------
    def add_bridge(self, name: str = "br0", *settings: str) -> None:
        extra: list[str] = []
        for setting in settings:
            extra += ["--", "set", "bridge", name, setting]
        self.vsctl("add-br", name, "--", "set", "bridge", name, "datapath_type=netdev", *extra)
        # The bridge's local port is a tap in the host namespace: up, so the bridge is
        # usable as an operator would have it.
        self.host.ip("link", "set", name, "up")

    def add_guest(self, tap: str, mac: str, ip4: str | None = None,
                  ip6: str | None = None) -> Guest:
        guest = add_guest(self.host, tap, mac, ip4, ip6)
        self.guests.append(guest)
        return guest

    def remove_guests(self) -> None:
        for guest in self.guests:
            guest.ns.delete()
        self.guests.clear()

    def nic_env(self, state: Path, conf: Path, guest: Guest, **overrides: str) -> dict[str, str]:
        nic = {"INSTANCE": f"{guest.tap}.example.org", "MAC": guest.mac, "MODE": "openvswitch",
               "LINK": "br0", "VLAN": "", "INTERFACE": guest.tap, "INTERFACE_INDEX": "0",
               "INTERFACE_UUID": guest.uuid, "IP": guest.ip4 or "",
               "NICHOOKS_OVSDB": self.db, "OVS_RUNDIR": str(self.dir),
               "NICHOOKS_OVS_TIMEOUT": "5"}
        nic.update(overrides)
        return hook_env(state, conf, **{k: v for k, v in nic.items() if v is not None})

    def hook(self, name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return self.host.run(bin_path(name), *args, env=env, check=False)


def _plain(value: Any) -> Any:
    """OVSDB JSON ("set"/"map"/"uuid" wrappers) to plain Python."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        kind, inner = value
        if kind == "set":
            return [_plain(v) for v in inner]
        if kind == "map":
            return {k: _plain(v) for k, v in inner}
        if kind == "uuid":
            return inner
    return value


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if not _alive(pid):
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Running: not gone and not a zombie (a detached daemon's parent may be a pid 1
    that never reaps)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# -- frames -----------------------------------------------------------------------------
def send_frames(guest: Guest, frames: list[bytes]) -> None:
    guest.run(sys.executable, FRAMES, "send", "eth0", *(f.hex() for f in frames), check=True)


def control_frame(guest: Guest, dst: str = pk.BROADCAST, vid: int | None = None
                  ) -> tuple[bytes, bytes]:
    """(frame, token): a frame the guest's port lets through (its own MAC and IPv4
    address, plain UDP; tagged `vid` for a trunk) carrying a fresh token. Sent after
    the frames under test on the same port, it leaves the switch after them: once a
    capture has it, the switch has dealt with everything before it."""
    token = new_token()
    src_ip = guest.ip4 or "192.0.2.1"  # a guest without addresses may use any
    frame = pk.ethernet(dst, guest.mac, 0x0800, pk.udp4(src_ip, "255.255.255.255", 9, 9, token),
                        vid=vid)
    return frame, token


def send_control(guest: Guest, dst: str = pk.BROADCAST, vid: int | None = None) -> bytes:
    """Send a control frame (see `control_frame`) from the guest; returns its token."""
    frame, token = control_frame(guest, dst, vid)
    send_frames(guest, [frame])
    return token


def send_control_from_bridge(sw: Switch, vid: int | None = None, bridge: str = "br0") -> bytes:
    """A control frame into the switch through the bridge's own (local) port, which
    carries every VLAN and has no anti-spoofing flows; returns its token."""
    token = new_token()
    frame = pk.ethernet(pk.BROADCAST, sw.host.link(bridge)["address"], CONTROL_ETHERTYPE, token,
                        vid=vid)
    sw.host.run(sys.executable, FRAMES, "send", bridge, frame.ljust(60, b"\0").hex())
    return token

