"""The NIC: one typed, validated object built from the caller's variables.

Every source (Ganeti's environment, a spec file, Ganeti's runtime files, a Xen NIC
file) is first turned into the variables Ganeti would have exported, and this module
is the only place that interprets them: one parser, one set of error messages,
whatever the caller. What LINK and VLAN mean depends on the mode: the mode's rules
(modes/base.Mode, passed in by modes.registry.nic_from_variables) are applied where
LINK and VLAN are read, so errors are reported in one fixed order whatever the mode.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from nichooks.errors import InvalidInput
from nichooks.model import validate
from nichooks.model.vlan import VlanSpec, parse_vlan

_MODE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}", re.ASCII)

# Every variable Ganeti passes to a NIC script, plus ACTION and
# MIGRATION_PHASE from Ganeti 3.2. These, and only these, are kept for custom scripts.
GANETI_VARS = (
    "INSTANCE", "MAC", "MODE", "INTERFACE", "INTERFACE_INDEX", "INTERFACE_UUID",
    "INTERFACE_NAME", "TAGS", "IP", "LINK", "VLAN", "BRIDGE",
    "NETWORK_NAME", "NETWORK_UUID", "NETWORK_TAGS", "NETWORK_SUBNET",
    "NETWORK_GATEWAY", "NETWORK_SUBNET6", "NETWORK_GATEWAY6", "NETWORK_MAC_PREFIX",
    "ACTION", "MIGRATION_PHASE",
)

def ganeti_only(found: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """(Ganeti's NIC variables in `found`, the other names, sorted).

    A file's assignments describe a NIC and nothing else. Ganeti writes some values
    unquoted (a Xen NIC file's `INTERFACE_NAME=%s`), so a tenant's NIC name can add
    assignments of its own: a file must never set our settings (NICHOOKS_*,
    OVS_RUNDIR, GANETI_RUN_DIR) nor what root's scripts run with (PATH, LD_PRELOAD).
    """
    kept = {k: v for k, v in found.items() if k in GANETI_VARS}
    return kept, sorted(k for k in found if k not in GANETI_VARS)


# A fixed namespace so a NIC without INTERFACE_UUID (plain QEMU, Xen without a NIC
# file) gets the same journal key on every node and every run.
KEY_NAMESPACE = uuidlib.UUID("5b0c3e1e-8c1a-4f57-9d55-6e6963686f6b")


@dataclass(frozen=True)
class Network:
    """The Ganeti network the NIC is connected to (NETWORK_*), if any."""

    name: str | None = None
    uuid: str | None = None
    tags: tuple[str, ...] = ()
    subnet: str | None = None
    gateway: str | None = None
    subnet6: str | None = None
    gateway6: str | None = None
    mac_prefix: str | None = None


@dataclass(frozen=True)
class Nic:
    instance: str
    mac: str
    mode: str
    tap: str
    uuid: str
    uuid_derived: bool
    index: int | None = None
    name: str | None = None
    ip: validate.IPAddress | None = None
    link: str | None = None
    vlan: VlanSpec | None = None
    tags: tuple[str, ...] = ()
    network: Network = field(default_factory=Network)
    migration_phase: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    # A second device of the same NIC (a Xen HVM NIC's emulated "-emu" tap): journaled
    # under its own key, so neither plug undoes the other.
    device: str = ""

    @property
    def key(self) -> str:
        """The journal key: the NIC UUID, plus "-<device>" for a second device."""
        return f"{self.uuid}-{self.device}" if self.device else self.uuid

    def label(self) -> str:
        """How errors and logs name this NIC: instance, tap and UUID."""
        return f"{self.instance} {self.tap} ({self.uuid})"


class LinkRules(Protocol):
    """What a mode says about LINK and VLAN (modes/base.Mode implements it)."""

    @property
    def vlans(self) -> bool:
        """Whether VLAN means anything in the mode."""

    def link(self, link: str | None, bridge: str | None) -> str | None:
        """LINK as the mode reads it (BRIDGE: Ganeti 2.4's name for it), or InvalidInput."""


def derive_uuid(instance: str, mac: str) -> str:
    return str(uuidlib.uuid5(KEY_NAMESPACE, f"{instance}\n{mac}"))


def _get(env: Mapping[str, str], name: str) -> str | None:
    """Optional variables: Ganeti exports some as empty strings (VLAN), which mean unset."""
    value = env.get(name)
    return value if value else None


def from_variables(env: Mapping[str, str], *, tap: str | None = None,
                   rules: LinkRules | None = None) -> Nic:
    """Build and validate a NIC. `rules`: the mode's LINK and VLAN rules (without them
    LINK is only checked as text). `tap` (argv[1]) is used only when INTERFACE is unset:
    when INTERFACE is set it is authoritative."""
    mode = _get(env, "MODE")
    if mode is None:
        raise InvalidInput("MODE", "is not set")
    if not _MODE_NAME.fullmatch(mode):
        raise InvalidInput("MODE", f"{mode[:40]!r} is not a mode name")

    interface = _get(env, "INTERFACE")
    if interface is not None:
        tap_name = validate.ifname("INTERFACE", interface)
    elif tap:
        tap_name = validate.ifname("argument TAP", tap)
    else:
        raise InvalidInput("INTERFACE", "is not set and no TAP argument was given")

    raw_mac = _get(env, "MAC")
    if raw_mac is None:
        raise InvalidInput("MAC", "is not set")
    mac = validate.mac("MAC", raw_mac)

    raw_instance = _get(env, "INSTANCE")
    instance = validate.instance("INSTANCE", raw_instance) if raw_instance else tap_name

    raw_uuid = _get(env, "INTERFACE_UUID")
    if raw_uuid is not None:
        nic_uuid, derived = validate.uuid("INTERFACE_UUID", raw_uuid), False
    else:
        nic_uuid, derived = derive_uuid(raw_instance or "", mac), True

    raw_index = _get(env, "INTERFACE_INDEX")
    raw_ip = _get(env, "IP")
    link = _get(env, "LINK")
    bridge = _get(env, "BRIDGE")
    if bridge is not None:
        validate.ifname("BRIDGE", bridge)
    if rules is not None:
        link = rules.link(link, bridge)
    elif link is not None:
        # Whatever the mode makes of it, LINK reaches scripts, the journal and log lines:
        # no control characters (a newline would forge a line), bounded length.
        link = validate.free_text("LINK", link)

    vlan = parse_vlan(env.get("VLAN", ""), "VLAN")
    if vlan is not None and rules is not None and not rules.vlans:
        raise InvalidInput("VLAN", f"{env['VLAN']!r} makes no sense in {mode} mode")

    name = _get(env, "INTERFACE_NAME")
    phase = _get(env, "MIGRATION_PHASE")
    if phase is not None and phase not in ("pre", "post"):
        raise InvalidInput("MIGRATION_PHASE", f"{phase!r} is not 'pre' or 'post'")
    action = _get(env, "ACTION")
    if action is not None and action not in ("up", "down"):
        raise InvalidInput("ACTION", f"{action!r} is not 'up' or 'down'")

    network = _network(env)
    nic = Nic(
        instance=instance,
        mac=mac,
        mode=mode,
        tap=tap_name,
        uuid=nic_uuid,
        uuid_derived=derived,
        index=validate.index("INTERFACE_INDEX", raw_index) if raw_index is not None else None,
        name=validate.free_text("INTERFACE_NAME", name) if name is not None else None,
        ip=validate.ip_address("IP", raw_ip) if raw_ip is not None else None,
        link=link,
        vlan=vlan,
        tags=validate.tags("TAGS", env.get("TAGS", "")),
        network=network,
        migration_phase=phase,
        variables={},
    )
    return _with_variables(nic, env)


def _network(env: Mapping[str, str]) -> Network:
    def opt(name: str) -> str | None:
        return _get(env, name)

    subnet, gateway = opt("NETWORK_SUBNET"), opt("NETWORK_GATEWAY")
    subnet6, gateway6 = opt("NETWORK_SUBNET6"), opt("NETWORK_GATEWAY6")
    net_uuid, prefix, name = opt("NETWORK_UUID"), opt("NETWORK_MAC_PREFIX"), opt("NETWORK_NAME")
    # The validated address is what is used from here on, never the raw text: the
    # check trims, and " 2001:db8::1" would otherwise pass it and fail deep in a step.
    if gateway is not None:
        gw = validate.ip_address("NETWORK_GATEWAY", gateway)
        if gw.version != 4:
            raise InvalidInput("NETWORK_GATEWAY", f"{gateway!r} is not an IPv4 address")
        gateway = str(gw)
    if gateway6 is not None:
        gw6 = validate.ip_address("NETWORK_GATEWAY6", gateway6)
        if gw6.version != 6:
            raise InvalidInput("NETWORK_GATEWAY6", f"{gateway6!r} is not an IPv6 address")
        gateway6 = str(gw6)
    return Network(
        name=validate.free_text("NETWORK_NAME", name) if name is not None else None,
        uuid=validate.uuid("NETWORK_UUID", net_uuid) if net_uuid is not None else None,
        tags=validate.tags("NETWORK_TAGS", env.get("NETWORK_TAGS", "")),
        subnet=str(validate.ip_network("NETWORK_SUBNET", subnet, 4)) if subnet else None,
        gateway=gateway,
        subnet6=str(validate.ip_network("NETWORK_SUBNET6", subnet6, 6)) if subnet6 else None,
        gateway6=gateway6,
        mac_prefix=validate.mac_prefix("NETWORK_MAC_PREFIX", prefix) if prefix else None,
    )


def _with_variables(nic: Nic, env: Mapping[str, str]) -> Nic:
    """The Ganeti variables as custom scripts should see them: validated, with
    INTERFACE naming the device we actually plug and TAGS space-separated."""
    out = {name: env[name] for name in GANETI_VARS if name in env}
    out["INTERFACE"] = nic.tap
    out["MAC"] = nic.mac
    out["MODE"] = nic.mode
    out["INTERFACE_UUID"] = nic.uuid
    out["INSTANCE"] = nic.instance
    out["TAGS"] = " ".join(nic.tags)
    if "NETWORK_TAGS" in out:
        out["NETWORK_TAGS"] = " ".join(nic.network.tags)
    if nic.link is not None:
        out["LINK"] = nic.link
    out.pop("ACTION", None)
    object.__setattr__(nic, "variables", out)
    return nic

