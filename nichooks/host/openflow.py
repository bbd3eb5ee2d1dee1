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
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

COOKIE_PREFIX = 0x4E48  # "NH"
COOKIE_MASK_PREFIX = 0xFFFF << 48
PREFIX_MATCH = f"cookie=0x{COOKIE_PREFIX << 48:016x}/0x{COOKIE_MASK_PREFIX:016x}"

# Priorities, all matched on in_port, so they never meet another port's flows.
P_DROP = 1000      # anything else from the port
P_TAGGED = 1050    # tagged frames of a trunk port: MAC check only
P_ALLOW = 1100     # the guest's own addresses, DHCP, link-local, DAD, RS
P_DENY = 1150      # spoofing shapes the allows would let through
P_EXCEPT = 1200    # the legitimate cases of those shapes
OUR_PRIORITIES = frozenset({P_DROP, P_TAGGED, P_ALLOW, P_DENY, P_EXCEPT})

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
    trunks: tuple[int, ...] = ()  # tagged VLANs the guest may send on (never the native one)
    mode: str = "on"              # "on": MAC and IPs; "mac": MAC only

    @property
    def link_local(self) -> str:
        """The guest's EUI-64 link-local address (what the kernel derives by default)."""
        from nichooks.model.addresses import LINK_LOCAL, eui64

        return eui64(LINK_LOCAL, self.mac)


def antispoof_flows(guest: Guest) -> list[str]:
    """The flows, without cookie (one bundle applies them atomically).

    Untagged frames get the full check. Tagged frames pass only for the trunk VLANs
    that were asked for (never the native VLAN, never VID 0: OVS would put those on
    the native VLAN and skip the untagged checks) and are checked for the source MAC
    and the never-from-a-guest shapes only."""
    port = f"in_port={guest.ofport}"
    own = f"{port},dl_src={guest.mac}"
    flows = [f"priority={P_DROP},{port},actions=drop"]
    for vid in guest.trunks:
        flows.append(f"priority={P_TAGGED},{own},vlan_tci=0x{0x1000 | vid:04x}/0x1fff,actions=NORMAL")
    untagged = f"{own},{UNTAGGED}"
    filter_ips = guest.mode == "on" and bool(guest.ipv4 or guest.ipv6)
    v6_own = (*guest.ipv6, guest.link_local)

    def allow(match: str, priority: int = P_ALLOW) -> None:
        flows.append(f"priority={priority},{untagged},{match},actions=NORMAL")

    def deny(match: str, untagged_only: bool = False) -> None:
        flows.append(f"priority={P_DENY},{port},{UNTAGGED + ',' if untagged_only else ''}"
                     f"{match},actions=drop")

    # ARP: the sender MAC is always the guest's; with IPs, the sender IP too (or the
    # 0.0.0.0 of an RFC 5227 probe).
    for spa in (*guest.ipv4, "0.0.0.0") if filter_ips else ("",):
        allow(f"arp,arp_sha={guest.mac}" + (f",arp_spa={spa}" if spa else ""))
    # Never from a guest, tagged or not: DHCP server replies (whatever the source
    # port: clients only look at the destination), router advertisements, redirects.
    deny("udp,tp_dst=68")
    deny("udp6,tp_dst=546")
    deny("icmp6,icmp_type=134")
    deny("icmp6,icmp_type=137")
    # Neighbour discovery on the untagged network: solicitations carry the guest's MAC
    # (or no option) and come from its own addresses (or :: for DAD, without option);
    # advertisements are for its own addresses and carry its MAC (or no option).
    deny("icmp6,icmp_type=135", untagged_only=True)
    deny("icmp6,icmp_type=136", untagged_only=True)
    sources = v6_own if filter_ips else ("",)
    targets = v6_own if filter_ips else ("",)
    for lladdr in (guest.mac, ZERO_MAC):
        for src in sources:
            allow(f"icmp6,icmp_type=135,nd_sll={lladdr}" + (f",ipv6_src={src}" if src else ""),
                  P_EXCEPT)
        for target in targets:
            allow(f"icmp6,icmp_type=136,nd_tll={lladdr}" + (f",nd_target={target}" if target else ""),
                  P_EXCEPT)
    if filter_ips:
        allow(f"icmp6,icmp_type=135,nd_sll={ZERO_MAC},ipv6_src=::", P_EXCEPT)  # DAD
    if not filter_ips:
        allow("ip")
        allow("ipv6")
        return flows
    for addr in guest.ipv4:
        allow(f"ip,nw_src={addr}")
    allow("udp,nw_src=0.0.0.0,tp_src=68,tp_dst=67")  # DHCP discover/request
    for addr in v6_own:
        allow(f"ipv6,ipv6_src={addr}")                # its addresses; link-local: RS, MLD, DHCPv6
    for icmp_type in (133, 143):                      # RS and MLDv2 reports from ::
        allow(f"icmp6,ipv6_src=::,icmp_type={icmp_type}")
    return flows


# A dumped flow (`--no-stats --no-names`) exactly as `add` leaves one: table 0, no
# timeouts, flags or importance, a priority and a match. Anything else is not ours.
_OUR_SHAPE = re.compile(r"cookie=0x([0-9a-f]{1,16}), priority=(\d+),(\S+) actions=\S+")
_IN_PORT = re.compile(r"(?:^|,)in_port=(\d+)(?:,|$)")


@dataclass(frozen=True)
class Flow:
    """One dumped flow in the shape `antispoof_flows` gives: enough to tell whether it
    could be ours, and to delete exactly it (strict: cookie, priority and match)."""

    cookie: int
    priority: int
    match: str

    @property
    def in_port(self) -> int | None:
        found = _IN_PORT.search(self.match)
        return int(found.group(1)) if found else None

    def antispoof_shaped(self) -> bool:
        """At one of our priorities and on one port: every flow `antispoof_flows` makes
        is. A cookie prefix alone is not enough: other software (a Neutron agent picks a
        random cookie at every restart) may have 0x4e48 as its top 16 bits."""
        return self.priority in OUR_PRIORITIES and self.in_port is not None

    def strict(self) -> str:
        return f"{cookie_match(self.cookie)},priority={self.priority},{self.match}"


def parse_flow(line: str) -> Flow | None:
    """A `dump-flows --no-stats --no-names` line as a Flow; None if it is not shaped
    like one we add (another table, a timeout, a flag, no priority)."""
    found = _OUR_SHAPE.fullmatch(line.strip())
    if found is None:
        return None
    return Flow(int(found.group(1), 16), int(found.group(2)), found.group(3))


class OpenFlowError(Exception):
    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


class OpenFlow:
    """ovs-ofctl against one bridge's management socket in OVS_RUNDIR
    (`<rundir>/<bridge>.mgmt`), with a timeout on every call: a hook must never hang."""

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

    def _flow_mods(self, what: str, bridge: str, text: str) -> None:
        """Flow mods (`add-flows` file syntax) in one OpenFlow 1.4 bundle, or one by one
        on a bridge whose `protocols` exclude OpenFlow 1.4."""
        try:
            self._run(what, ["-O", "OpenFlow14", "--bundle", "add-flows", self.target(bridge), "-"],
                      text)
        except OpenFlowError as exc:
            if "version negotiation failed" not in exc.stderr:
                raise
            self._run(what, ["add-flows", self.target(bridge), "-"], text)

    def add(self, bridge: str, cookie_value: int, flows: list[str], ofport: int) -> None:
        """All flows in one OpenFlow 1.4 bundle: all of them or none. A bridge whose
        `protocols` exclude OpenFlow 1.4 gets them one by one, catch-all drop first
        (the tap is still down, so nothing passes in between; a failure part-way is
        rolled back by cookie like any other)."""
        text = "".join(f"add cookie=0x{cookie_value:016x},{flow}\n" for flow in flows)
        # First, in the same bundle: flows another NIC of ours left on this port number
        # (its ifdown never ran) would otherwise apply to this guest.
        # And this NIC's own flows wherever they are: re-applied after its port was
        # re-created under a new number, they would otherwise be there twice.
        text = (f"delete in_port={ofport},{PREFIX_MATCH}\n"
                f"delete {cookie_match(cookie_value)}\n" + text)
        self._flow_mods("add-flows", bridge, text)

    def delete(self, bridge: str, cookie_value: int) -> None:
        self._run("del-flows", ["del-flows", self.target(bridge), cookie_match(cookie_value)])

    def cookies(self, bridge: str) -> set[int]:
        """The cookies of every flow of ours on the bridge (any NIC)."""
        out = self._run("dump-flows", ["--no-stats", "dump-flows", self.target(bridge), PREFIX_MATCH])
        found = set()
        for line in out.splitlines():
            for part in line.replace(",", " ").split():
                if part.startswith("cookie="):
                    found.add(int(part[7:], 16))
        return found

    def flows(self, bridge: str) -> list[Flow]:
        """Every flow with our cookie prefix that is shaped like one we add (any NIC);
        the rest are someone else's whatever their cookie."""
        out = self._run("dump-flows", ["--no-stats", "--no-names", "dump-flows", self.target(bridge),
                                       PREFIX_MATCH])
        return [flow for line in out.splitlines() if (flow := parse_flow(line)) is not None]

    def delete_exactly(self, bridge: str, flows: Sequence[Flow]) -> None:
        """Delete these flows and nothing else, in one bundle: strict matches on cookie,
        priority and match, so a flow added since with the same cookie but another
        match (a new plug of the NIC on another port number) stays."""
        if flows:
            self._flow_mods("del-flows", bridge,
                            "".join(f"delete_strict {flow.strict()}\n" for flow in flows))

    def dump(self, bridge: str, cookie_value: int) -> list[str]:
        out = self._run("dump-flows", ["--no-stats", "--no-names", "dump-flows", self.target(bridge),
                                       cookie_match(cookie_value)])
        return [line.strip() for line in out.splitlines() if "cookie=" in line]


def ofctl_path() -> str:
    """By absolute path: Ganeti's PATH may lack /usr/bin's neighbours."""
    return shutil.which("ovs-ofctl", path="/usr/bin:/usr/sbin:/usr/local/bin:/bin") or "ovs-ofctl"
