"""Ganeti's serialized NIC, turned back into the environment of its ``kvm-ifup``.

The runtime file is Ganeti's own JSON (``objects.NIC.ToDict()`` per NIC), untrusted
like everything in its run directory and changing shape across Ganeti versions. A
file or field not shaped as Ganeti writes it means no answer, never a guessed one:
an ifdown acts on what we return. A file that is not such JSON gives None; a NIC
field of the wrong type raises :class:`Garbage`, which the caller turns into None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nichooks.callers.ganeti_run_dir import read_file

if TYPE_CHECKING:  # annotations only: a hook pays for every import
    from pathlib import Path
    from typing import Any

# Ganeti exports BRIDGE=<link> for NICs of this nicparams mode (constants.NIC_MODE_BRIDGED).
GANETI_NIC_MODE_BRIDGED = "bridged"
MAX_RUNTIME_FILE = 16 * 1024 * 1024
"""Runtime files hold a QEMU command line and a few dicts per device: kilobytes."""


class Garbage(Exception):
    """A runtime file that is not what Ganeti writes; turned into None."""


def load_runtime_nics(run_dir: Path, instance: str) -> list[dict[str, Any]] | None:
    conf = run_dir / "kvm-hypervisor" / "conf"
    data = read_file(conf, f"{instance}.runtime", MAX_RUNTIME_FILE)
    if data is None:
        return None
    import json  # only once a tap file matched: most calls never get here

    try:
        runtime = json.loads(data[0])
    except (ValueError, RecursionError):
        return None
    if not isinstance(runtime, list) or len(runtime) < 2:
        return None
    nics = runtime[1]
    if not isinstance(nics, list) or not all(isinstance(n, dict) for n in nics):
        return None
    return nics


def hook_env(instance: str, tap: str, seq: int | None, nic: dict[str, Any]) -> dict[str, str]:
    """Rebuild ``hv_base.ConfigureNIC``'s environment from one runtime NIC dict."""
    params = nic.get("nicparams")
    if not isinstance(params, dict):
        raise Garbage
    mac = _required_str(nic, "mac")
    uuid = _required_str(nic, "uuid")
    mode = _required_str(params, "mode")
    env = {"INSTANCE": instance, "MAC": mac, "MODE": mode, "INTERFACE": tap}
    if seq is not None:
        env["INTERFACE_INDEX"] = str(seq)
    env["INTERFACE_UUID"] = uuid
    ip = _optional_str(nic, "ip")
    if ip:
        env["IP"] = ip
    name = _optional_str(nic, "name")
    if name:
        env["INTERFACE_NAME"] = name
    link = _optional_str(params, "link") or ""
    if link:
        env["LINK"] = link
    vlan = _optional_str(params, "vlan")
    if vlan is not None:  # Ganeti exports it whenever the key exists, even empty
        env["VLAN"] = vlan
    if _optional_str(nic, "network"):
        env.update(_network_env(nic.get("netinfo")))
    if mode == GANETI_NIC_MODE_BRIDGED:  # Ganeti's own rule for its exports, not ours
        env["BRIDGE"] = link
    return env


def _network_env(netinfo: object) -> dict[str, str]:
    """``objects.Network.HooksDict()`` from the network dict Ganeti embeds."""
    if netinfo is None:
        return {}
    if not isinstance(netinfo, dict):
        raise Garbage
    env = {}
    for key, field in (("NETWORK_NAME", "name"), ("NETWORK_UUID", "uuid")):
        value = _optional_str(netinfo, field)
        if value is not None:
            env[key] = value
    tags = netinfo.get("tags")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise Garbage
    env["NETWORK_TAGS"] = " ".join(tags)
    for key, field in (
        ("NETWORK_SUBNET", "network"),
        ("NETWORK_GATEWAY", "gateway"),
        ("NETWORK_SUBNET6", "network6"),
        ("NETWORK_GATEWAY6", "gateway6"),
        ("NETWORK_MAC_PREFIX", "mac_prefix"),
    ):
        value = _optional_str(netinfo, field)
        if value:
            env[key] = value
    return env


def _required_str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise Garbage
    return value


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    """A string field; None when absent or null (``ToDict`` drops None values)."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Garbage
    return value
