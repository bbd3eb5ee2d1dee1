"""The agent's link-event decoder, on hand-built netlink messages."""

from __future__ import annotations

import socket
import struct

from nichooks.host.linkwatch import RTM_DELLINK, RTM_NEWLINK, decode


def message(kind: int, index: int, name: str, *, family: int = socket.AF_UNSPEC,
            up: bool = True, master: int | None = None) -> bytes:
    def attr(kind_: int, value: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(value), kind_) + value
        return raw + b"\0" * (-len(raw) % 4)

    attrs = attr(3, name.encode() + b"\0")
    if master is not None:
        attrs += attr(10, struct.pack("=I", master))
    body = struct.pack("=BxHiII", family, 1, index, 1 if up else 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_new_and_deleted_links_with_master() -> None:
    data = message(RTM_NEWLINK, 7, "tap0", master=3) + message(RTM_DELLINK, 8, "tap1", up=False)
    [new, gone] = decode(data)
    assert (new.deleted, new.index, new.name, new.up, new.master) == (False, 7, "tap0", True, 3)
    assert (gone.deleted, gone.index, gone.name, gone.up, gone.master) == (True, 8, "tap1", False, None)


def test_bridge_family_messages_are_not_device_events() -> None:
    """`ip link set tap0 nomaster` sends an AF_BRIDGE RTM_DELLINK for tap0: the port
    left its bridge, the device is still there."""
    data = message(RTM_DELLINK, 7, "tap0", family=socket.AF_BRIDGE) + message(RTM_NEWLINK, 7, "tap0")
    [event] = decode(data)
    assert not event.deleted and event.name == "tap0"


def test_truncated_input_is_not_a_crash() -> None:
    data = message(RTM_NEWLINK, 7, "tap0")
    for cut in range(len(data)):
        decode(data[:cut])
