"""Raw Ethernet frames in and out of a guest namespace (run there with `ip netns exec`).

    frames.py send IFNAME HEX...        send each frame exactly as given
    frames.py capture IFNAME SECONDS    print "ready", then "VID HEX" per frame received
                                        (VID "-" when untagged; HEX without the tag)

The kernel may hand a received VLAN tag over out of band (PACKET_AUXDATA) rather
than in the frame; both are reported the same way.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time

ETH_P_ALL = 3
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10


def send(ifname: str, frames: list[str]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        for frame in frames:
            s.send(bytes.fromhex(frame))


def capture(ifname: str, seconds: float) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        s.bind((ifname, ETH_P_ALL))
        print("ready", flush=True)
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([s], [], [], left)[0]:
                return
            frame, ancdata, _flags, addr = s.recvmsg(65535, socket.CMSG_LEN(64))
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            vid: int | None = None
            for level, kind, data in ancdata:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= 20:
                    status, _len, _snaplen, _mac, _net, tci = struct.unpack_from("IIIHHH", data)
                    if status & TP_STATUS_VLAN_VALID:
                        vid = tci & 0xFFF
            if vid is None and frame[12:14] == b"\x81\x00":
                vid = int.from_bytes(frame[14:16], "big") & 0xFFF
                frame = frame[:12] + frame[16:]
            print(f"{'-' if vid is None else vid} {frame.hex()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3:])
    else:
        capture(sys.argv[2], float(sys.argv[3]))
