"""A host namespace with bridges and a guest namespace behind a veth "tap"."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.constants import GUEST_MAC
from tests.support.hooks import bin_path, hook_env
from tests.support.netns import Netns


@dataclass
class Site:
    host: Netns
    guest: Netns
    state: Path
    conf: Path
    nic_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    bridges: list[str] = field(default_factory=list)

    def add_bridge(self, name: str, mtu: int = 1500, addr: str | None = None) -> None:
        self.host.ip("link", "add", name, "type", "bridge")
        # Set after creation, as an operator would: only then does the kernel keep it
        # (an MTU given at creation is auto-adjusted back to 1500 when ports leave).
        self.host.ip("link", "set", name, "mtu", str(mtu))
        # Likewise a fixed MAC, as a bridge with an uplink has: one without takes the
        # lowest port MAC and falls back to all zeros when the last port leaves.
        self.host.ip("link", "set", name, "address", f"02:00:00:00:00:{len(self.bridges) + 1:02x}")
        self.bridges.append(name)
        if addr:
            self.host.ip("addr", "add", addr, "dev", name)
        self.host.ip("link", "set", name, "up")

    def add_tap(self, tap: str = "tap0", guest_if: str = "eth0",
                guest_addr: str | None = "192.0.2.2/24") -> None:
        """A veth pair: `tap` stays on the host and plays the guest's tap, the other
        end is the guest's NIC in the guest namespace."""
        self.host.ip("link", "add", tap, "type", "veth", "peer", "name", guest_if,
                     "netns", self.guest.name)
        self.guest.ip("link", "set", guest_if, "address", GUEST_MAC)
        if guest_addr:
            self.guest.ip("addr", "add", guest_addr, "dev", guest_if)
        self.guest.ip("link", "set", guest_if, "up")

    def env(self, **overrides: str) -> dict[str, str]:
        nic = {"INSTANCE": "inst1.example.org", "MAC": GUEST_MAC, "MODE": "bridged",
               "LINK": "br0", "VLAN": "", "INTERFACE": "tap0", "INTERFACE_INDEX": "0",
               "INTERFACE_UUID": self.nic_uuid, "TAGS": "web prod"}
        nic.update(overrides)
        return hook_env(self.state, self.conf, **{k: v for k, v in nic.items() if v is not None})

    def hook(self, name: str, *args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        return self.host.run(bin_path(name), *args, env=env if env is not None else self.env(),
                             check=False)
