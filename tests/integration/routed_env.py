"""A routed-mode world on the real kernel: a router, two hypervisor hosts A and B, and
guests behind veth "taps".

    router ns:  br-up (198.51.100.1/24, 2001:db8:100::1/64, fixed MAC)
                  ├─ pa ══ a-up  in host A (198.51.100.2/24, 2001:db8:100::2/64)
                  └─ pb ══ b-up  in host B (198.51.100.3/24, 2001:db8:100::3/64)
    host X:     tap0 ══ eth0 in a guest ns (the guest's MAC and addresses,
                default routes via .1 / ::1)

Each host has the default routes in `main` and in table 100. The guest's addresses
are inside the router's on-link subnets, so the router resolves them with ARP / NDP,
and the host that holds the guest answers for them (the proxy entries routed mode
puts on the uplink), then routes them to the tap (the host route).

Traffic that arrives on an uplink is looked up in table 100 only if the operator
says so: `ip rule iif <uplink> lookup 100` at priority 10000, part of the host's own
configuration (not ours; ours sit at 20000). Without it, `main`'s connected
198.51.100.0/24 on the uplink would win over the host route in table 100, and the
kernel neither proxies (the route back points at the asking interface) nor
forwards. With no LINK (host routes in `main`) that rule must not exist.

Every namespace (guests' too) is made here and deleted when `make_world`'s block ends,
whatever happened; the root namespace is never touched.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.constants import GUEST_MAC, OTHER_MAC
from tests.support.hooks import bin_path, hook_env, wait_for
from tests.support.netns import Netns
from tests.support.packets import eui64

TABLE = "100"
PRIORITY = 20000
PROTO = "241"
UPLINK_RULE_PRIORITY = 10000

ROUTER_MAC = "02:00:00:00:01:01"
GW4, GW6 = "198.51.100.1", "2001:db8:100::1"
SUBNET4, SUBNET6 = "198.51.100.0/24", "2001:db8:100::/64"

GUEST4 = "198.51.100.50"
OTHER4 = "198.51.100.51"
GUEST6 = eui64(SUBNET6, GUEST_MAC)   # 2001:db8:100:0:a800:ff:fe11:2233
OTHER6 = eui64(SUBNET6, OTHER_MAC)
assert GUEST6 == "2001:db8:100:0:a800:ff:fe11:2233"

# Sysctls a routed host needs and the values a ready host has.
GLOBAL_READY = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}


def uplink_ready(uplink: str) -> dict[str, str]:
    return {f"net.ipv6.conf.{uplink}.proxy_ndp": "1", f"net.ipv6.conf.{uplink}.accept_ra": "0"}


def tap_sysctl_keys(tap: str) -> list[str]:
    return [f"net.ipv4.conf.{tap}.proxy_arp", f"net.ipv4.conf.{tap}.forwarding",
            f"net.ipv6.conf.{tap}.proxy_ndp", f"net.ipv6.conf.{tap}.forwarding",
            f"net.ipv6.conf.{tap}.accept_ra"]


@dataclass
class Host:
    name: str          # "a" / "b"
    ns: Netns
    uplink: str        # a-up / b-up
    mac: str           # the uplink's MAC (fixed)
    addr4: str
    addr6: str
    state: Path
    conf: Path
    iproute2: Path

    def sysctl(self, key: str) -> str:
        return self.ns.sysctl(key)

    def set_sysctl(self, key: str, value: str) -> None:
        self.ns.run("sysctl", "-qw", f"{key}={value}")

    def sysctls(self, keys: list[str]) -> dict[str, str]:
        return {k: self.sysctl(k) for k in keys}

    # --- observation, through `ip -j` --------------------------------------------
    def our_rules(self, fam: str, priority: int = PRIORITY) -> list[dict[str, Any]]:
        return [r for r in self.ns.ipj(fam, "rule", "show") if r.get("priority") == priority]

    def routes(self, fam: str, table: str = TABLE) -> list[dict[str, Any]]:
        return self.ns.ipj(fam, "route", "show", "table", table)  # type: ignore[no-any-return]

    def host_routes(self, fam: str, table: str = TABLE) -> list[dict[str, Any]]:
        """Routes in `table` that are not a default route (ours are host routes)."""
        return [r for r in self.routes(fam, table) if r.get("dst") != "default"]

    def proxies(self, fam: str, dev: str | None = None) -> list[dict[str, Any]]:
        found = self.ns.ipj(fam, "neigh", "show", "proxy")
        return [p for p in found if dev is None or p.get("dev") == dev]


@dataclass
class Guest:
    ns: Netns
    host: Host
    tap: str
    mac: str
    addr4: str | None
    addr6: str | None
    nic_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class World:
    router: Netns
    hosts: dict[str, Host]
    tmp: Path
    namespaces: list[Netns] = field(default_factory=list)

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    # --- guests -------------------------------------------------------------------
    def new_guest_ns(self) -> Netns:
        ns = Netns()
        self.namespaces.append(ns)
        ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        return ns

    def plug(self, host: Host, ns: Netns | None = None, *, tap: str = "tap0",
             guest_if: str = "eth0", mac: str = GUEST_MAC, addr4: str | None = GUEST4,
             addr6: str | None = GUEST6, nic_uuid: str | None = None) -> Guest:
        """A veth pair: `tap` in the host (left down, as a fresh tap is), `guest_if`
        in the guest namespace with the guest's MAC and addresses, up, with default
        routes via the gateways."""
        ns = ns or self.new_guest_ns()
        host.ns.ip("link", "add", tap, "type", "veth", "peer", "name", guest_if, "netns", ns.name)
        ns.ip("link", "set", guest_if, "address", mac)
        if addr4:
            ns.ip("addr", "add", f"{addr4}/24", "dev", guest_if)
        if addr6:
            ns.ip("addr", "add", f"{addr6}/64", "dev", guest_if, "nodad")
        ns.ip("link", "set", guest_if, "up")
        if addr4:
            ns.ip("route", "add", "default", "via", GW4, "dev", guest_if)
        if addr6:
            ns.ip("-6", "route", "add", "default", "via", GW6, "dev", guest_if)
        guest = Guest(ns=ns, host=host, tap=tap, mac=mac, addr4=addr4, addr6=addr6)
        if nic_uuid:
            guest.nic_uuid = nic_uuid
        return guest

    # --- hooks --------------------------------------------------------------------
    def env(self, host: Host, guest: Guest | None = None, **overrides: str | None) -> dict[str, str]:
        """The environment Ganeti would pass for a routed NIC, plus our settings.
        An override of None removes the variable."""
        nic: dict[str, str | None] = {
            "INSTANCE": "inst1.example.org",
            "MAC": guest.mac if guest else GUEST_MAC,
            "MODE": "routed",
            "LINK": TABLE,
            "IP": guest.addr4 if guest else GUEST4,
            "INTERFACE": guest.tap if guest else "tap0",
            "INTERFACE_INDEX": "0",
            "INTERFACE_UUID": guest.nic_uuid if guest else str(uuid.uuid4()),
            "NETWORK_SUBNET": SUBNET4,
            "NETWORK_GATEWAY": GW4,
            "NETWORK_SUBNET6": SUBNET6,
            "NETWORK_GATEWAY6": GW6,
            "NICHOOKS_IPROUTE2_DIR": str(host.iproute2),
        }
        nic.update(overrides)
        return hook_env(host.state, host.conf, **{k: v for k, v in nic.items() if v is not None})

    def hook(self, host: Host, name: str, *args: str, env: dict[str, str]
             ) -> subprocess.CompletedProcess[str]:
        return host.ns.run(bin_path(name), *args, env=env, check=False, timeout=60)

    def ifup(self, host: Host, guest: Guest, **overrides: str | None) -> subprocess.CompletedProcess[str]:
        return self.hook(host, "kvm-ifup", guest.tap, env=self.env(host, guest, **overrides))

    def ifdown(self, host: Host, tap: str = "tap0", context: str | None = None
               ) -> subprocess.CompletedProcess[str]:
        """ifdown as Ganeti (or QEMU) calls it on that host: no NIC variables."""
        env = hook_env(host.state, host.conf, NICHOOKS_IPROUTE2_DIR=str(host.iproute2))
        return self.hook(host, "kvm-ifdown", tap, *([context] if context else []), env=env)

    def announce(self, host: Host, tap: str = "tap0") -> subprocess.CompletedProcess[str]:
        """`nichooks announce TAP` as an operator runs it: settings only."""
        env = hook_env(host.state, host.conf, NICHOOKS_IPROUTE2_DIR=str(host.iproute2))
        return self.hook(host, "nichooks", "announce", tap, env=env)

    # --- the router's view --------------------------------------------------------
    def router_neigh(self, addr: str) -> dict[str, Any] | None:
        found = self.router.ipj("neigh", "show", "to", addr, "dev", "br-up")
        return found[0] if found else None

    def router_mac_for(self, addr: str) -> str | None:
        entry = self.router_neigh(addr)
        return entry.get("lladdr") if entry else None

    def wait_router_points_at(self, addr: str, mac: str, timeout: float = 20.0) -> dict[str, Any]:
        return wait_for(  # type: ignore[no-any-return]
            f"router's entry for {addr} -> {mac} (now {self.router_neigh(addr)})",
            lambda: (n := self.router_neigh(addr)) and n.get("lladdr") == mac and n, timeout)


def ping(ns: Netns, addr: str, deadline: int = 8) -> subprocess.CompletedProcess[str]:
    """One answered echo within `deadline` seconds (proxy replies to broadcast and
    multicast solicitations are delayed up to 0.8 s by the kernel)."""
    return ns.run("ping", "-c", "1", "-i", "0.3", "-w", str(deadline), addr, check=False,
                  timeout=deadline + 10)


def assert_ping(ns: Netns, addr: str) -> None:
    r = ping(ns, addr)
    assert r.returncode == 0, f"ping {addr} from {ns.name} failed:\n{r.stdout}{r.stderr}"


def _host(router: Netns, tmp: Path, name: str, octet: int, *, ready: bool, uplink_rule: bool,
          namespaces: list[Netns]) -> Host:
    ns = Netns()
    namespaces.append(ns)
    uplink, port = f"{name}-up", f"p{name}"
    mac = f"02:00:00:00:0{name}:01"
    base = tmp / f"host-{name}"
    state, conf, iproute2 = base / "state", base / "conf", base / "iproute2"
    for d in (state, conf, iproute2 / "rt_tables.d"):
        d.mkdir(parents=True)
    (iproute2 / "rt_tables").write_text("255\tlocal\n254\tmain\n253\tdefault\n0\tunspec\n")
    host = Host(name=name, ns=ns, uplink=uplink, mac=mac, addr4=f"198.51.100.{octet}",
                addr6=f"2001:db8:100::{octet}", state=state, conf=conf, iproute2=iproute2)
    # Addresses usable at once: no duplicate address detection anywhere.
    host.set_sysctl("net.ipv6.conf.default.accept_dad", "0")
    host.set_sysctl("net.ipv6.conf.all.accept_dad", "0")
    if ready:
        for key, value in GLOBAL_READY.items():
            host.set_sysctl(key, value)
    else:  # a fresh host: nothing forwards, and uplinks take router advertisements
        host.set_sysctl("net.ipv4.ip_forward", "0")
        host.set_sysctl("net.ipv6.conf.all.forwarding", "0")
    router.ip("link", "add", port, "type", "veth", "peer", "name", uplink, "netns", ns.name)
    router.ip("link", "set", port, "master", "br-up")
    router.ip("link", "set", port, "up")
    ns.ip("link", "set", uplink, "address", mac)
    if ready:
        for key, value in uplink_ready(uplink).items():
            host.set_sysctl(key, value)
    else:
        host.set_sysctl(f"net.ipv6.conf.{uplink}.proxy_ndp", "0")
        host.set_sysctl(f"net.ipv6.conf.{uplink}.accept_ra", "1")
    ns.ip("addr", "add", f"{host.addr4}/24", "dev", uplink)
    ns.ip("addr", "add", f"{host.addr6}/64", "dev", uplink, "nodad")
    ns.ip("link", "set", uplink, "up")
    for table in ("main", TABLE):
        ns.ip("route", "add", "default", "via", GW4, "dev", uplink, "table", table)
        ns.ip("-6", "route", "add", "default", "via", GW6, "dev", uplink, "table", table)
    if uplink_rule:
        for fam in ("-4", "-6"):
            ns.ip(fam, "rule", "add", "iif", uplink, "lookup", TABLE,
                  "priority", str(UPLINK_RULE_PRIORITY))
    wait_for(f"{uplink} up", lambda: ns.link(uplink).get("operstate") == "UP")
    return host


@contextmanager
def make_world(tmp: Path, *, ready: bool = True, uplink_rule: bool = True,
               hosts: tuple[str, ...] = ("a", "b")) -> Iterator[World]:
    """ready: the hosts' sysctls are already what routed mode needs (forwarding on,
    proxy_ndp on the uplinks, accept_ra=0 there); otherwise a fresh host's defaults.
    uplink_rule: the operator's `iif <uplink> lookup 100` rule (needed with LINK)."""
    namespaces: list[Netns] = []
    try:
        router = Netns()
        namespaces.append(router)
        router.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        router.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        router.ip("link", "add", "br-up", "type", "bridge", "mcast_snooping", "0")
        router.ip("link", "set", "br-up", "address", ROUTER_MAC)
        router.ip("addr", "add", f"{GW4}/24", "dev", "br-up")
        router.ip("addr", "add", f"{GW6}/64", "dev", "br-up", "nodad")
        router.ip("link", "set", "br-up", "up")
        built = {}
        for name, octet in (("a", 2), ("b", 3)):
            if name in hosts:
                built[name] = _host(router, tmp, name, octet, ready=ready,
                                    uplink_rule=uplink_rule, namespaces=namespaces)
        world = World(router=router, hosts=built, tmp=tmp, namespaces=namespaces)
        yield world
    finally:
        for ns in reversed(namespaces):
            ns.delete()
