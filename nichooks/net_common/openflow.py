"""Anti-spoofing flows for one OVS port, and the ovs-ofctl calls that place and
remove them.

The flows are an allow-list on the port's traffic *from* the guest (in_port): a
catch-all drop at the lowest of our priorities, the guest's own traffic above it,
and the few spoofing shapes that would otherwise match an allow (neighbour
advertisements for someone else's address, router advertisements, DHCP server
replies) dropped above that. Traffic *to* the guest is untouched: the bridge's own
NORMAL flow still does all forwarding.

Every flow carries the NIC's cookie: a fixed prefix (so a sweep can tell our flows
from anyone else's) and 48 bits derived from the NIC UUID. ifdown deletes by cookie,
whatever the port number is by then (Neutron's habit).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

COOKIE_PREFIX = 0x4E48  # "NH"
COOKIE_MASK_PREFIX = 0xFFFF << 48

# Priorities, all matched on in_port, so they never meet another port's flows.
P_DROP = 1000      # anything else from the port
P_TAGGED = 1050    # tagged frames of a trunk port: MAC check only
P_ALLOW = 1100     # the guest's own addresses, DHCP, link-local, DAD, RS
P_DENY = 1150      # spoofing shapes the allows would let through
P_EXCEPT = 1200    # the legitimate cases of those shapes

UNTAGGED = "vlan_tci=0x0000/0x1000"
ZERO_MAC = "00:00:00:00:00:00"
ANTISPOOF_MODES = ("on", "mac", "off")


def cookie(key: str) -> int:
    """The NIC's flow cookie: prefix << 48 | 48 bits of a hash of the NIC key."""
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)
    return (COOKIE_PREFIX << 48) | digest


def cookie_match(value: int) -> str:
    return f"cookie=0x{value:016x}/-1"


@dataclass(frozen=True)
class Guest:
    """What may leave the port: the MAC always; with IPs known, only those."""

    ofport: int
    mac: str
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    trunks: bool = False  # tagged frames allowed (a trunk was asked for)
    mode: str = "on"      # "on": MAC and IPs; "mac": MAC only


def antispoof_flows(guest: Guest) -> list[str]:
    """The flows, without cookie, in the order ovs-ofctl dumps nothing about (one
    bundle applies them atomically)."""
    port = f"in_port={guest.ofport}"
    own = f"{port},dl_src={guest.mac}"
    flows = [f"priority={P_DROP},{port},actions=drop"]
    if guest.trunks:
        flows.append(f"priority={P_TAGGED},{own},vlan_tci=0x1000/0x1000,actions=NORMAL")
    untagged = f"{own},{UNTAGGED}"
    filter_ips = guest.mode == "on" and bool(guest.ipv4 or guest.ipv6)

    def allow(match: str, priority: int = P_ALLOW) -> None:
        flows.append(f"priority={priority},{untagged},{match},actions=NORMAL")

    def deny(match: str) -> None:
        # untagged only: a trunk's tagged VLANs are the guest's own networks, checked
        # for the source MAC alone (P_TAGGED)
        flows.append(f"priority={P_DENY},{port},{UNTAGGED},{match},actions=drop")

    # ARP: the sender MAC is always the guest's; with IPs, the sender IP too (or the
    # 0.0.0.0 of an RFC 5227 probe).
    for spa in (*guest.ipv4, "0.0.0.0") if filter_ips else ("",):
        allow(f"arp,arp_sha={guest.mac}" + (f",arp_spa={spa}" if spa else ""))
    # Never from a guest: DHCP server replies, router advertisements and redirects.
    deny("udp,tp_src=67,tp_dst=68")
    deny("udp6,tp_src=547,tp_dst=546")
    deny("icmp6,icmp_type=134")
    deny("icmp6,icmp_type=137")
    # Neighbour solicitations and advertisements may only carry the guest's MAC
    # (or none), and advertisements only the guest's addresses (or link-local).
    deny("icmp6,icmp_type=135")
    deny("icmp6,icmp_type=136")
    for lladdr in (guest.mac, ZERO_MAC):
        allow(f"icmp6,icmp_type=135,nd_sll={lladdr}", P_EXCEPT)
        targets = (*guest.ipv6, "fe80::/64") if filter_ips else ("",)
        for target in targets:
            allow(f"icmp6,icmp_type=136,nd_tll={lladdr}"
                  + (f",nd_target={target}" if target else ""), P_EXCEPT)
    if not filter_ips:
        allow("ip")
        allow("ipv6")
        return flows
    for addr in guest.ipv4:
        allow(f"ip,nw_src={addr}")
    allow("udp,nw_src=0.0.0.0,tp_src=68,tp_dst=67")  # DHCP discover/request
    for addr in guest.ipv6:
        allow(f"ipv6,ipv6_src={addr}")
    allow("ipv6,ipv6_src=fe80::/10")                  # link-local: ND, RS, MLD, DHCPv6
    for icmp_type in (133, 135, 143):                 # RS, DAD and MLDv2 from ::
        allow(f"icmp6,ipv6_src=::,icmp_type={icmp_type}")
    return flows


class OpenFlowError(Exception):
    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


class OpenFlow:
    """ovs-ofctl against one bridge's management socket in OVS_RUNDIR (DESIGN §4:
    `<rundir>/<bridge>.mgmt`), with a timeout on every call."""

    def __init__(self, rundir: Path, timeout: float) -> None:
        self.rundir = rundir
        self.timeout = timeout

    def target(self, bridge: str) -> str:
        return f"unix:{self.rundir / (bridge + '.mgmt')}"

    def exists(self, bridge: str) -> bool:
        return (self.rundir / (bridge + ".mgmt")).exists()

    def _run(self, what: str, args: Sequence[str], stdin: str = "") -> str:
        exe = ofctl_path()
        seconds = max(int(self.timeout), 1)
        try:
            done = subprocess.run([exe, f"--timeout={seconds}", *args], input=stdin,
                                  capture_output=True, text=True, timeout=self.timeout + 2,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise OpenFlowError(f"ovs-ofctl {what} did not finish in {self.timeout:g}s") from None
        except OSError as exc:
            raise OpenFlowError(f"cannot run {exe}: {exc.strerror}") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise OpenFlowError(f"ovs-ofctl {what}: {lines[-1] if lines else 'failed'}", done.stderr)
        return done.stdout

    def add(self, bridge: str, cookie_value: int, flows: list[str]) -> None:
        """All flows in one OpenFlow 1.4 bundle: all of them or none. A bridge whose
        `protocols` exclude OpenFlow 1.4 gets them one by one, catch-all drop first
        (the tap is still down, so nothing passes in between; a failure part-way is
        rolled back by cookie like any other)."""
        text = "".join(f"cookie=0x{cookie_value:016x},{flow}\n" for flow in flows)
        try:
            self._run("add-flows", ["-O", "OpenFlow14", "--bundle", "add-flows", self.target(bridge),
                                    "-"], text)
        except OpenFlowError as exc:
            if "version negotiation failed" not in exc.stderr:
                raise
            self._run("add-flows", ["add-flows", self.target(bridge), "-"], text)

    def delete(self, bridge: str, cookie_value: int) -> None:
        self._run("del-flows", ["del-flows", self.target(bridge), cookie_match(cookie_value)])

    def dump(self, bridge: str, cookie_value: int) -> list[str]:
        out = self._run("dump-flows", ["--no-stats", "dump-flows", self.target(bridge),
                                       cookie_match(cookie_value)])
        return [line.strip() for line in out.splitlines() if "cookie=" in line]


def ofctl_path() -> str:
    """By absolute path: Ganeti's PATH may lack /usr/bin's neighbours (DESIGN §4)."""
    return shutil.which("ovs-ofctl", path="/usr/bin:/usr/sbin:/usr/local/bin:/bin") or "ovs-ofctl"
