"""How strictly one NIC is filtered: the host's NICHOOKS_ANTISPOOF, narrowed or widened
per instance by Ganeti tags, and the addresses the guest may send from.

Operators need exceptions per guest (a VRRP or keepalived pair moving a floating
address, a router VM), and Ganeti's instance tags are where they keep such facts:
- `nichooks:antispoof:off` / `nichooks:antispoof:mac` lower the level for this
  instance only (a tag never raises it above the host's setting);
- `nichooks:allow-ip:ADDR`, repeatable, adds a source address the guest may use.

A tag in our `nichooks:` namespace that is not one of these is invalid input: a typo
must not silently leave a guest filtered differently from what its operator wrote.
Every mode (bridged, routed, openvswitch) reads the policy here, so the same tags mean
the same thing whatever the NIC is plugged into.
"""

from __future__ import annotations

from dataclasses import dataclass

from nichooks.errors import InvalidInput
from nichooks.model import validate
from nichooks.model.addresses import LINK_LOCAL, eui64, guest_addresses
from nichooks.model.nic import Nic

LEVELS = ("off", "mac", "on")  # weakest first
TAG_PREFIX = "nichooks:"


@dataclass(frozen=True)
class FilterPolicy:
    """What a NIC's filter allows. `level`: on (MAC and addresses), mac (MAC only),
    off (no filter). `ipv6` includes the EUI-64 link-local address."""

    level: str
    mac: str
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()

    @property
    def filters_ips(self) -> bool:
        """Addresses are checked only when some are known: a guest whose address
        Ganeti does not know (its own DHCP server, say) keeps the MAC checks only."""
        return self.level == "on" and bool(self.ipv4 or self.ipv6)


def _tag_rules(tags: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """(the lowest level a tag asks for or None, the extra addresses), or InvalidInput."""
    level: str | None = None
    extra: list[str] = []
    for tag in tags:
        if not tag.startswith(TAG_PREFIX):
            continue
        what, _, value = tag[len(TAG_PREFIX):].partition(":")
        if what == "antispoof" and value in ("off", "mac"):
            if level is None or LEVELS.index(value) < LEVELS.index(level):
                level = value
        elif what == "allow-ip" and value:
            addr = str(validate.ip_address("TAGS", value))
            if addr not in extra:
                extra.append(addr)
        else:
            raise InvalidInput("TAGS", f"tag {tag!r} is not one of nichooks:antispoof:off, "
                               "nichooks:antispoof:mac, nichooks:allow-ip:ADDR")
    return level, extra


def filter_policy(nic: Nic, host_level: str) -> FilterPolicy:
    """The NIC's filter under the host's level `host_level` (Settings.antispoof)."""
    tag_level, extra = _tag_rules(nic.tags)
    level = host_level
    if tag_level is not None and LEVELS.index(tag_level) < LEVELS.index(level):
        level = tag_level
    v4, v6 = guest_addresses(nic)
    ipv4 = [*v4, *(a for a in extra if ":" not in a and a not in v4)]
    ipv6 = [*v6, *(a for a in extra if ":" in a and a not in v6)]
    link_local = eui64(LINK_LOCAL, nic.mac)
    if (ipv4 or ipv6) and link_local not in ipv6:
        ipv6.append(link_local)  # what a guest's router solicitations and MLD come from
    return FilterPolicy(level=level, mac=nic.mac, ipv4=tuple(ipv4), ipv6=tuple(ipv6))
