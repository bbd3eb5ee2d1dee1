"""Link events from the kernel (RTNLGRP_LINK), for the agent.

A plain netlink socket and a 40-line decoder of the three fields the agent needs
(index, name, flags, master), rather than pyroute2: pyroute2 0.9 reads ahead and
buffers messages internally, so a `select` on its socket can say "nothing to read"
while events wait in its buffer, and the agent must wake within milliseconds of a tap
vanishing. Overflow (ENOBUFS, hundreds of taps gone at once) is reported, not hidden:
the agent answers it with a full sweep.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME, IFLA_MASTER = 3, 10
IFF_UP = 0x1
_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_RTA = struct.Struct("=HH")


@dataclass(frozen=True)
class LinkEvent:
    deleted: bool
    index: int
    name: str
    up: bool
    master: int | None


class Overflow(Exception):
    """The kernel dropped events: the receiver must resynchronise from scratch."""


def decode(data: bytes) -> list[LinkEvent]:
    events = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            break
        body = offset + _NLMSG.size
        if kind in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFO.size <= offset + length:
            family, _type, index, flags, _change = _IFINFO.unpack_from(data, body)
            if family != socket.AF_UNSPEC:
                # AF_BRIDGE: a port joining or leaving a bridge (an RTM_DELLINK of
                # these is a port leaving its bridge, not a device going away).
                offset += (length + 3) & ~3
                continue
            name, master = "", None
            at = body + _IFINFO.size
            end = offset + length
            while at + _RTA.size <= end:
                rta_len, rta_type = _RTA.unpack_from(data, at)
                if rta_len < _RTA.size:
                    break
                value = data[at + _RTA.size:at + rta_len]
                if rta_type == IFLA_IFNAME:
                    name = value.split(b"\0", 1)[0].decode(errors="replace")
                elif rta_type == IFLA_MASTER and len(value) >= 4:
                    master = struct.unpack_from("=I", value)[0] or None
                at += (rta_len + 3) & ~3
            events.append(LinkEvent(kind == RTM_DELLINK, index, name, bool(flags & IFF_UP), master))
        offset += (length + 3) & ~3
    return events


class LinkWatch:
    def __init__(self, rcvbuf: int = 4 << 20) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        try:  # root may exceed rmem_max; anyone else gets what the limit allows
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, RTMGRP_LINK))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[LinkEvent]:
        """Every event queued now (possibly none); Overflow if some were lost."""
        events: list[LinkEvent] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise Overflow() from None
                raise
            events += decode(data)

    def close(self) -> None:
        self.sock.close()


__all__ = ["LinkEvent", "LinkWatch", "Overflow", "decode"]
