"""Ethernet frames built by hand, so a test can send exactly the forgery it means, and
read back by hand, independently of the code that built the frames under test."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any

from tests.support.frames import is_arp_or_na

BROADCAST = "ff:ff:ff:ff:ff:ff"


# --- addresses ---------------------------------------------------------------------------
def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def eui64(prefix: str, mac: str) -> str:
    """The modified EUI-64 address of `mac` in the /64 `prefix` (fe80::/64: the
    link-local address the kernel derives from the MAC), computed here."""
    net = ipaddress.IPv6Network(prefix)
    assert net.prefixlen == 64
    b = mac_bytes(mac)
    iid = bytes([b[0] ^ 2, b[1], b[2], 0xFF, 0xFE]) + b[3:]
    return str(ipaddress.IPv6Address(net.network_address.packed[:8] + iid))


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`: 0 over data that carries a correct one."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmp6_pseudo_header(src: bytes, dst: bytes, length: int) -> bytes:
    return src + dst + struct.pack("!I3xB", length, 58)


# --- building ----------------------------------------------------------------------------
def ethernet(dst: str, src: str, ethertype: int, payload: bytes, vid: int | None = None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vid) if vid is not None else b""
    return mac_bytes(dst) + mac_bytes(src) + tag + struct.pack("!H", ethertype) + payload


def udp4(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 packet carrying one UDP datagram (UDP checksum 0: optional in IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return (struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac_bytes(sha)
            + ipaddress.IPv4Address(spa).packed + mac_bytes(tha) + ipaddress.IPv4Address(tpa).packed)


def icmp6(src: str, dst: str, icmp_type: int, body: bytes) -> bytes:
    """An IPv6 packet carrying one ICMPv6 message, checksum computed."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    message = struct.pack("!BBH", icmp_type, 0, 0) + body
    pseudo = _icmp6_pseudo_header(s, d, len(message))
    message = message[:2] + struct.pack("!H", checksum(pseudo + message)) + message[4:]
    return struct.pack("!IHBB", 0x60000000, len(message), 58, 255) + s + d + message


def neighbour_advert(src: str, target: str, mac: str) -> bytes:
    """An unsolicited NA (override flag) for `target` with target link-layer `mac`."""
    body = struct.pack("!I", 0x20000000) + ipaddress.IPv6Address(target).packed
    body += struct.pack("!BB", 2, 1) + mac_bytes(mac)
    return icmp6(src, "ff02::1", 136, body)


def router_advert(src: str) -> bytes:
    return icmp6(src, "ff02::1", 134, struct.pack("!BBHII", 64, 0, 1800, 0, 0))


def neighbour_solicit(src: str, target: str, mac: str | None) -> bytes:
    """A multicast NS for `target`, with source link-layer option `mac` (None: without)."""
    body = bytes(4) + ipaddress.IPv6Address(target).packed
    if mac is not None:
        body += struct.pack("!BB", 1, 1) + mac_bytes(mac)
    solicited = ipaddress.IPv6Address("ff02::1:ff00:0").packed[:13] + \
        ipaddress.IPv6Address(target).packed[13:]
    return icmp6(src, str(ipaddress.IPv6Address(solicited)), 135, body)


# --- reading -----------------------------------------------------------------------------
def parse_arp(frame: bytes) -> dict[str, Any]:
    """An untagged Ethernet/IPv4 ARP frame, field by field."""
    dst, src, etype = struct.unpack_from("!6s6sH", frame)
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
    assert etype == 0x0806 and (htype, ptype, hlen, plen) == (1, 0x0800, 6, 4)
    return {"dst": dst, "src": src, "op": op, "sha": sha, "spa": socket.inet_ntoa(spa),
            "tha": tha, "tpa": socket.inet_ntoa(tpa), "len": len(frame)}


def parse_na(frame: bytes) -> dict[str, Any]:
    """An untagged ICMPv6 Neighbour Advertisement (no extension headers), field by
    field, with whether its checksum is right."""
    dst_mac, src_mac, etype = struct.unpack_from("!6s6sH", frame)
    vtf, plen, nxt, hops, src, dst = struct.unpack_from("!IHBB16s16s", frame, 14)
    icmp = frame[54:54 + plen]
    kind, code, _csum, flags, target = struct.unpack_from("!BBHI16s", icmp)
    return {"dst_mac": dst_mac, "src_mac": src_mac, "etype": etype, "version": vtf >> 28,
            "next": nxt, "hops": hops, "src": ipaddress.IPv6Address(src),
            "dst": ipaddress.IPv6Address(dst), "type": kind, "code": code,
            "checksum_ok": checksum(_icmp6_pseudo_header(src, dst, plen) + icmp) == 0,
            "router": bool(flags & 0x80000000), "solicited": bool(flags & 0x40000000),
            "override": bool(flags & 0x20000000), "target": ipaddress.IPv6Address(target),
            "options": icmp[24:]}


@dataclass
class Announcement:
    kind: str          # "garp-request", "garp-reply", "na"
    src_mac: str
    addr: str
    override: bool = False


def announcement(frame: bytes) -> Announcement | None:
    """A gratuitous ARP (request or reply) or an NA, decoded; None for anything else."""
    if not is_arp_or_na(frame):
        return None
    if frame[12:14] == b"\x08\x06":
        a = parse_arp(frame)
        if a["spa"] != a["tpa"]:
            return None
        return Announcement("garp-request" if a["op"] == 1 else "garp-reply", mac_str(a["src"]), a["spa"])
    na = parse_na(frame)
    return Announcement("na", mac_str(na["src_mac"]), str(na["target"]), override=na["override"])


def announcements(frames: list[bytes]) -> list[Announcement]:
    """The gratuitous ARPs and NAs among `frames`, decoded."""
    return [a for frame in frames if (a := announcement(frame)) is not None]
