"""Ethernet frames built by hand, so a test can send exactly the forgery it means."""

from __future__ import annotations

import ipaddress
import struct

BROADCAST = "ff:ff:ff:ff:ff:ff"


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def ethernet(dst: str, src: str, ethertype: int, payload: bytes, vid: int | None = None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vid) if vid is not None else b""
    return mac_bytes(dst) + mac_bytes(src) + tag + struct.pack("!H", ethertype) + payload


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp4(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 packet carrying one UDP datagram (UDP checksum 0: optional in IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return (struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac_bytes(sha)
            + ipaddress.IPv4Address(spa).packed + mac_bytes(tha) + ipaddress.IPv4Address(tpa).packed)


def icmp6(src: str, dst: str, icmp_type: int, body: bytes) -> bytes:
    """An IPv6 packet carrying one ICMPv6 message, checksum computed."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    message = struct.pack("!BBH", icmp_type, 0, 0) + body
    pseudo = s + d + struct.pack("!I3xB", len(message), 58)
    message = message[:2] + struct.pack("!H", _checksum(pseudo + message)) + message[4:]
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
