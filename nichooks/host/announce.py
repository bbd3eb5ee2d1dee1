"""Tell the segment that an address now lives behind this interface: a gratuitous
ARP (request and reply) for IPv4 and an unsolicited Neighbour Advertisement for IPv6,
sent from raw sockets (stdlib only; no arping, no ndsend).

Routed mode calls these on the uplink after a guest arrives, so that the
upstream router sends the guest's traffic here at once instead of to the old host.

What a Linux neighbour on the segment does with them (kernel 6.x defaults, proven in
tests/integration/test_announce.py):

- **It has an entry for the address** (any state, pointing at the old host's MAC):
  both announcements rewrite it to our MAC, state STALE (a broadcast or multicast
  announcement never asserts reachability; the next use of the entry probes us by
  unicast and makes it REACHABLE). The ARP neighbour's one-second `locktime` ("use the
  first of several replies") does not hold back a *gratuitous* ARP: sender IP equal
  to target IP, and for the reply also target MAC equal to sender MAC, which is why
  the reply carries our MAC in both fields. The NA carries the Override flag and no
  Solicited flag; without Override an existing entry's MAC would not be replaced.
- **It has no entry**: by default nothing is created — `arp_accept=0` and
  `accept_untracked_na=0`. Nothing is lost: its next packet for the address resolves
  afresh and reaches us (through the proxy ARP / proxy NDP entry routed mode puts on
  the uplink). `arp_accept=1` (or `2`, when the address is in one of the receiving
  interface's subnets) makes the kernel create a STALE entry from a gratuitous ARP;
  `accept_untracked_na=1` (or `2`, same-subnet source: our link-local source
  qualifies) creates one from an unsolicited NA, but only on an interface with IPv6
  forwarding on (a router; RFC 9131), never on a host. A neighbour with
  `drop_gratuitous_arp=1` / `drop_unsolicited_na=1` ignores them altogether.

The NA goes out from the interface's link-local address. While that address is still
tentative (duplicate address detection runs for about a second after the link comes
up), or when the interface has none (`addrgenmode none`, IPv6 disabled on it), the
kernel refuses it as a source, so the NA is then built whole (Ethernet, IPv6 header,
checksum) and sent on a packet socket: from the tentative link-local if there is one,
else from the EUI-64 link-local derived from the MAC. Neighbours accept it either way;
waiting out DAD instead would delay the announcement that is meant to be immediate.

Errors are `AnnounceError` (a `PlumbingError`), naming the interface and the address.
"""

from __future__ import annotations

import fcntl
import socket
import struct

from nichooks.errors import PlumbingError
from nichooks.host.closing import release

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ETH_ZLEN = 60  # minimum Ethernet frame without FCS; short frames are padded
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
SIOCGIFHWADDR = 0x8927
IFNAMSIZ = 16

ALL_NODES = "ff02::1"
ALL_NODES_MAC = bytes.fromhex("333300000001")
ND_NEIGHBOR_ADVERT = 136
NA_FLAG_OVERRIDE = 0x20000000  # R=0x80000000 S=0x40000000 O=0x20000000
ND_OPT_TARGET_LL_ADDR = 2
ND_HOP_LIMIT = 255  # receivers drop ND messages with any other hop limit

# /proc/net/if_inet6: the link-local scope and the address flags that matter here.
SCOPE_LINK = 0x20
IFA_F_OPTIMISTIC = 0x04
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
IF_INET6 = "/proc/net/if_inet6"  # per network namespace (a link to /proc/self/net)


class AnnounceError(PlumbingError):
    """An announcement could not be sent; says which interface, which address, why."""

    def __init__(self, ifname: str, ip: str, cause: str, errno: int | None = None) -> None:
        self.ifname = ifname
        self.ip = ip
        self.errno = errno
        super().__init__(f"cannot announce {ip} on {ifname}: {cause}")


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _fail(ifname: str, ip: str, doing: str, exc: OSError) -> AnnounceError:
    return AnnounceError(ifname, ip, f"{doing}: {_why(exc)}", exc.errno)


def _ifindex(ifname: str, ip: str) -> int:
    """The interface's index in this namespace; AnnounceError if there is none."""
    raw = ifname.encode(errors="surrogateescape")
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.strip() != raw:
        raise AnnounceError(ifname, ip, "not a valid interface name")
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise AnnounceError(ifname, ip, "no such interface", 19) from None  # ENODEV


def _hwaddr(sock: socket.socket, ifname: str, ip: str) -> bytes:
    """The interface's own MAC (SIOCGIFHWADDR); refuses non-Ethernet links."""
    try:
        ifr = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, struct.pack("16s24x", ifname.encode()))
    except OSError as e:
        if e.errno == 19:
            raise AnnounceError(ifname, ip, "no such interface", e.errno) from None
        raise _fail(ifname, ip, "reading its MAC address", e) from None
    family, mac = struct.unpack_from("H6s", ifr, IFNAMSIZ)
    if family != ARPHRD_ETHER:
        raise AnnounceError(ifname, ip, f"not an Ethernet interface (link type {family})")
    return bytes(mac)


def _packet_socket(ifname: str, ip: str) -> tuple[socket.socket, bytes]:
    """A raw packet socket bound to the interface (protocol 0: it never receives),
    and the interface's MAC."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except OSError as e:
        raise _fail(ifname, ip, "opening a packet socket", e) from None
    try:
        try:
            sock.bind((ifname, 0))
        except OSError as e:
            if e.errno == 19:
                raise AnnounceError(ifname, ip, "no such interface", e.errno) from None
            raise _fail(ifname, ip, "binding a packet socket", e) from None
        return sock, _hwaddr(sock, ifname, ip)
    except BaseException:
        sock.close()
        raise


def _send(sock: socket.socket, data: bytes, ifname: str, ip: str, what: str,
          address: tuple[str, int, int, int] | None = None) -> None:
    try:
        sent = sock.send(data) if address is None else sock.sendto(data, address)
    except OSError as e:
        raise _fail(ifname, ip, f"sending {what}", e) from None
    if sent != len(data):
        raise AnnounceError(ifname, ip, f"sending {what}: short write ({sent} of {len(data)} bytes)")


# --- IPv4 -----------------------------------------------------------------------------


def arp_frame(mac: bytes, ipv4: bytes, op: int) -> bytes:
    """A broadcast gratuitous ARP frame from `mac` for `ipv4` (packed), padded to 60 bytes.

    Sender IP = target IP. A request's target MAC is zero (RFC 5227); a reply's is
    our own MAC, the form Linux needs to treat a reply as gratuitous (arping -A)."""
    tha = mac if op == ARPOP_REPLY else ZERO_MAC
    arp = struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, 0x0800, 6, 4, op, mac, ipv4, tha, ipv4)
    frame = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP) + arp
    return frame.ljust(ETH_ZLEN, b"\0")


def gratuitous_arp(ifname: str, ip: str, count: int = 1) -> None:
    """Send `count` rounds of a gratuitous ARP request and reply for IPv4 `ip` on
    `ifname`, from the interface's MAC, to the broadcast address."""
    try:
        ipv4 = socket.inet_pton(socket.AF_INET, ip)
    except (OSError, ValueError, TypeError):
        raise AnnounceError(ifname, ip, "not an IPv4 address") from None
    _ifindex(ifname, ip)
    sock, mac = _packet_socket(ifname, ip)
    try:
        frames = (arp_frame(mac, ipv4, ARPOP_REQUEST), arp_frame(mac, ipv4, ARPOP_REPLY))
        for _ in range(count):
            for frame in frames:
                _send(sock, frame, ifname, ip, "gratuitous ARP")
    finally:
        release(sock, sock.close)


# --- IPv6 -----------------------------------------------------------------------------


def na_message(target: bytes, mac: bytes, checksum: int = 0) -> bytes:
    """An unsolicited Neighbour Advertisement (ICMPv6): Override set, Solicited and
    Router clear, for `target` (packed), with a Target Link-Layer Address option."""
    return struct.pack("!BBHI16sBB6s", ND_NEIGHBOR_ADVERT, 0, checksum, NA_FLAG_OVERRIDE,
                       target, ND_OPT_TARGET_LL_ADDR, 1, mac)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def na_frame(mac: bytes, source: bytes, target: bytes) -> bytes:
    """The whole Ethernet frame of an unsolicited NA from `source` to ff02::1,
    hop limit 255, checksum computed here (for packet sockets)."""
    dst = socket.inet_pton(socket.AF_INET6, ALL_NODES)
    body = na_message(target, mac)
    pseudo = source + dst + struct.pack("!I3xB", len(body), socket.IPPROTO_ICMPV6)
    body = na_message(target, mac, _checksum(pseudo + body))
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), socket.IPPROTO_ICMPV6, ND_HOP_LIMIT,
                      source, dst)
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ip6 + body


def eui64_link_local(mac: bytes) -> bytes:
    """fe80::/64 with the modified EUI-64 interface identifier of `mac`."""
    import ipaddress

    from nichooks.model.addresses import LINK_LOCAL, eui64

    return ipaddress.IPv6Address(eui64(LINK_LOCAL, mac.hex(":"))).packed


def link_local(ifindex: int) -> tuple[bytes, bool] | None:
    """The interface's link-local address and whether the kernel will send from it
    (not tentative, or optimistic), preferring a usable one; None if it has none."""
    try:
        with open(IF_INET6, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:  # IPv6 disabled in this kernel
        return None
    found: tuple[bytes, bool] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 5 or int(fields[1], 16) != ifindex or int(fields[3], 16) != SCOPE_LINK:
            continue
        flags = int(fields[4], 16)
        if flags & IFA_F_DADFAILED:
            continue
        usable = not flags & IFA_F_TENTATIVE or bool(flags & IFA_F_OPTIMISTIC)
        if found is None or (usable and not found[1]):
            found = (bytes.fromhex(fields[0]), usable)
    return found


class _NoSource(Exception):
    """The kernel would not send from the link-local address after all."""


def _na_raw(ifname: str, ifindex: int, ip: str, source: bytes, target: bytes, count: int) -> None:
    """Through an ICMPv6 raw socket, which computes the checksum itself."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    except OSError as e:
        raise _NoSource from e
    with sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ND_HOP_LIMIT)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ND_HOP_LIMIT)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        except OSError as e:
            raise _fail(ifname, ip, "setting up an ICMPv6 socket", e) from None
        mac = _hwaddr(sock, ifname, ip)
        try:
            sock.bind((socket.inet_ntop(socket.AF_INET6, source), 0, 0, ifindex))
        except OSError as e:
            raise _NoSource from e  # tentative again, or gone since we looked
        message = na_message(target, mac)
        for _ in range(count):
            _send(sock, message, ifname, ip, "unsolicited neighbour advertisement",
                  (ALL_NODES, 0, 0, ifindex))


def _na_packet(ifname: str, ip: str, source: bytes | None, target: bytes, count: int) -> None:
    """Through a packet socket, the IPv6 header built here."""
    sock, mac = _packet_socket(ifname, ip)
    try:
        frame = na_frame(mac, source or eui64_link_local(mac), target)
        for _ in range(count):
            _send(sock, frame, ifname, ip, "unsolicited neighbour advertisement")
    finally:
        release(sock, sock.close)


def unsolicited_na(ifname: str, ip: str, count: int = 1) -> None:
    """Send `count` unsolicited Neighbour Advertisements (Override) for IPv6 `ip` on
    `ifname` to ff02::1, carrying the interface's MAC, from its link-local address."""
    try:
        target = socket.inet_pton(socket.AF_INET6, ip)
    except (OSError, ValueError, TypeError):
        raise AnnounceError(ifname, ip, "not an IPv6 address") from None
    if target[0] == 0xFF:
        raise AnnounceError(ifname, ip, "a multicast address cannot be advertised")
    ifindex = _ifindex(ifname, ip)
    found = link_local(ifindex)
    if found is not None and found[1]:
        try:
            _na_raw(ifname, ifindex, ip, found[0], target, count)
            return
        except _NoSource:
            pass
    _na_packet(ifname, ip, found[0] if found else None, target, count)
