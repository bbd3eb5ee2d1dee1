"""Raw Ethernet frames in and out of a namespace.

Run inside a namespace (with `ip netns exec`):

    frames.py send IFNAME HEX...        send each frame exactly as given
    frames.py control IFNAME TOKENHEX   send one control frame (below) from IFNAME's MAC
    frames.py capture IFNAME SECONDS    print "ready" once bound, then "VID HEX" per frame
                                        received (VID "-" when untagged; HEX without the
                                        tag), for at most SECONDS

The kernel may hand a received VLAN tag over out of band (PACKET_AUXDATA) rather
than in the frame; both are reported the same way.

Imported by the tests (stdlib only, so that the file also runs as a script): `Listener`
runs the capture in a namespace and reads its frames as they come, and `send_control`
puts a control frame on a wire. A capture that waits for a control frame sent *after*
the action has seen everything the action put on that wire, however loaded the machine
is: "nothing arrived before the control frame" then means nothing was sent, not that
the capture window closed too early. `capture_announcements` does exactly that for the
ARP and NA frames a block of code sends.

Where the control frame must cross an Open vSwitch (whose anti-spoofing flows drop
what a guest may not send), tests/integration/ovs_env.py builds one the guest's port
lets through, and `Listener.until` / `received` take its token.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

ETH_P_ALL = 3
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10

SCRIPT = str(Path(__file__).resolve())
# IEEE 802 "local experimental" EtherType: nothing on a test's wires uses it.
CONTROL_ETHERTYPE = 0x88B5
# How long a test waits for frames that must arrive (a generous deadline on a loaded
# machine: a test only waits this long when it is about to fail).
DEADLINE = 20.0

Frame = tuple[int | None, bytes]  # (VLAN id or None, frame without its tag)


# --- run in a namespace ----------------------------------------------------------------
def send(ifname: str, frames: list[str]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        for frame in frames:
            s.send(bytes.fromhex(frame))


def raw_control_frame(src_mac: bytes, token: bytes) -> bytes:
    """A broadcast frame of the control EtherType carrying `token`, padded to 60 bytes."""
    return (b"\xff" * 6 + src_mac + struct.pack("!H", CONTROL_ETHERTYPE) + token).ljust(60, b"\0")


def send_control_here(ifname: str, token: bytes) -> None:
    mac = bytes.fromhex(Path(f"/sys/class/net/{ifname}/address").read_text().strip().replace(":", ""))
    send(ifname, [raw_control_frame(mac, token).hex()])


def capture(ifname: str, seconds: float) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        # Bound: from here on every frame received on `ifname` is queued to us.
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


# --- used by the tests -----------------------------------------------------------------
def is_arp_or_na(frame: bytes) -> bool:
    """An ARP frame, or an ICMPv6 Neighbour Advertisement (no extension headers): the
    shapes of an announcement."""
    etype = frame[12:14]
    return etype == b"\x08\x06" or (etype == b"\x86\xdd" and len(frame) > 54
                                     and frame[20] == 58 and frame[54] == 136)


def new_token() -> bytes:
    """A marker no other frame carries."""
    return b"NH-control-" + secrets.token_hex(8).encode()


def send_control(netns: str, ifname: str) -> bytes:
    """Send a control frame from `ifname` in `netns`; returns its token."""
    token = new_token()
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, SCRIPT, "control", ifname,
                    token.hex()], check=True, capture_output=True, timeout=60)
    return token


class Listener:
    """A capture on `ifname` in `netns`, bound before the constructor returns; its frames
    are read as they arrive. `limit` only bounds the process's life should the test
    never stop it."""

    def __init__(self, netns: str, ifname: str, limit: float = 300.0) -> None:
        self.where = f"{ifname} in {netns}"
        self.frames: list[Frame] = []
        self._buffer = b""
        self._ready = self._eof = False
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, SCRIPT, "capture", ifname, str(limit)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert self.proc.stdout is not None
            # Room for many frames while the test is busy elsewhere: a full pipe would
            # stall the capture and let the kernel drop frames.
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
            end = time.monotonic() + DEADLINE
            while not self._ready:
                left = end - time.monotonic()
                if left <= 0 or not self._read(left):
                    raise AssertionError(f"capture on {self.where} did not start: {self._stderr()}")
        except BaseException:
            self.close()
            raise

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace").strip()

    def _read(self, timeout: float) -> bool:
        """Read what the capture printed within `timeout`; False at its end (or none)."""
        assert self.proc.stdout is not None
        if self._eof or not select.select([self.proc.stdout], [], [], max(0.0, timeout))[0]:
            return False
        chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not self._ready:
                if line.strip() != b"ready":
                    raise AssertionError(f"capture on {self.where} did not start: {line!r}")
                self._ready = True
                continue
            vid, _, hexframe = line.decode().partition(" ")
            self.frames.append((None if vid == "-" else int(vid), bytes.fromhex(hexframe)))
        return True

    def wait(self, what: str, done: Callable[[list[Frame]], object],
             timeout: float = DEADLINE) -> list[Frame]:
        """Every frame received so far, once `done(frames)` holds; AssertionError naming
        `what` if it does not within `timeout` seconds."""
        end = time.monotonic() + timeout
        while not done(self.frames):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what} on "
                                     f"{self.where}; got {len(self.frames)} frames")
            if not self._read(left) and self._eof:
                raise AssertionError(f"capture on {self.where} ended before {what}: {self._stderr()}")
        return list(self.frames)

    def until(self, marker: bytes, timeout: float = DEADLINE) -> list[Frame]:
        """The frames received before the first one carrying `marker`, once it arrived."""
        def seen(frames: list[Frame]) -> bool:
            return any(marker in frame for _vid, frame in frames)

        frames = self.wait(f"the frame carrying {marker.decode(errors='replace')}", seen, timeout)
        return frames[:next(i for i, (_vid, frame) in enumerate(frames) if marker in frame)]

    def received(self, marker: bytes, before: bytes) -> list[int | None]:
        """The VLAN ids (None: untagged) of the frames carrying `marker` that arrived
        before the control frame carrying `before`."""
        return [vid for vid, frame in self.until(before) if marker in frame]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Heard:
    """The ARP and NA frames a capture saw; filled in when its `with` block ends."""

    frames: list[bytes] = field(default_factory=list)


@contextmanager
def capture_announcements(netns: str, ifname: str, sender: tuple[str, str]) -> Iterator[Heard]:
    """Collect the ARP and NA frames arriving on `ifname` in `netns` while the block runs.

    The capture is bound before the block starts. When the block ends, a control frame
    is sent from `sender` (namespace, interface: the other end of the wire the
    announcements travel on) and the capture reads until that frame has arrived: it
    has then seen everything the block put on the wire, however loaded the machine is,
    so no frames means nothing was announced."""
    heard = Heard()
    with Listener(netns, ifname) as listener:
        yield heard
        before = listener.until(send_control(*sender))
    heard.frames = [frame for _vid, frame in before if is_arp_or_na(frame)]


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "control":
        send_control_here(sys.argv[2], bytes.fromhex(sys.argv[3]))
    else:
        capture(sys.argv[2], float(sys.argv[3]))
