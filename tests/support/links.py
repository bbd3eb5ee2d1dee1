"""A tap plugged into a Linux bridge, as `ip -j -d link show` reports it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tests.support.netns import Netns


def assert_bridge_port(links: Netns | Mapping[str, dict[str, Any]], tap: str, bridge: str,
                       own_mac: str | None = None) -> None:
    """`tap` is plugged into `bridge` as bridged mode plugs it: enslaved, up, with the
    bridge's MTU and the MAC bridge.plan gives the tap, fe followed by the tap's own
    MAC (`own_mac`, read before the plug) without its first octet, so that the bridge
    never adopts it and it never equals the guest's. Where the tap's own MAC cannot be
    known (QEMU made the tap and plugged it at once), only its first octet is checked.
    `links`: the namespace, or its links as `Netns.links()` read them."""
    if isinstance(links, Netns):
        link, br = links.link(tap), links.link(bridge)
    else:
        link, br = links[tap], links[bridge]
    assert link.get("master") == bridge, f"{tap}: master {link.get('master')}, want {bridge}"
    assert "UP" in link["flags"], f"{tap} is not up: {link['flags']}"
    if own_mac is None:
        assert link["address"].startswith("fe:"), f"{tap}: MAC {link['address']} must start with fe"
    else:
        assert link["address"] == "fe" + own_mac[2:], \
            f"{tap}: MAC {link['address']}, want fe{own_mac[2:]} (its own was {own_mac})"
    assert link["mtu"] == br["mtu"], f"{tap}: MTU {link['mtu']}, bridge {bridge} has {br['mtu']}"
