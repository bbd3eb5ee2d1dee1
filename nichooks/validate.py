"""Validators for every value a hook reads from its caller.

Each returns the normalised value or raises InvalidInput naming the variable and
the problem. Anything that later becomes a file name, a device name or an argument
to another program passes through here first: this is what makes "never a shell,
never a path outside our state directory" hold.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib

from nichooks.errors import InvalidInput

IFNAMSIZ = 16  # the kernel's limit, including the terminating NUL

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_MAC_PREFIX = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){2}")
# Ganeti's tag rule (lib/utils/text.py, objects.TaggableObject): ^[\w.+*/:@-]+$, <=128.
_TAG = re.compile(r"[\w.+*/:@-]{1,128}", re.ASCII)
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", re.ASCII)
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", re.ASCII)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _printable(variable: str, value: str) -> None:
    for ch in value:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise InvalidInput(variable, f"contains a control character ({ch!r})")


def ifname(variable: str, value: str) -> str:
    """Linux interface-name rules (dev_valid_name): 1..15 bytes, not . or ..,
    no '/', ':' or whitespace."""
    if not value:
        raise InvalidInput(variable, "is empty")
    _printable(variable, value)
    if len(value.encode()) >= IFNAMSIZ:
        raise InvalidInput(variable, f"{value!r} is longer than {IFNAMSIZ - 1} bytes")
    if value in (".", ".."):
        raise InvalidInput(variable, f"{value!r} is not a valid interface name")
    for bad in "/: \t\n\r\x0b\x0c":
        if bad in value:
            raise InvalidInput(variable, f"{value!r} contains {bad!r}, not allowed in an interface name")
    if not value.isascii():
        raise InvalidInput(variable, f"{value!r} is not ASCII")
    return value


def mac(variable: str, value: str) -> str:
    norm = value.strip().lower()
    if not _MAC.fullmatch(norm):
        raise InvalidInput(variable, f"{value!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    first = int(norm[:2], 16)
    if first & 1:
        raise InvalidInput(variable, f"{value!r} is a multicast MAC address")
    if norm == "00:00:00:00:00:00":
        raise InvalidInput(variable, "is the all-zero MAC address")
    return norm


def mac_prefix(variable: str, value: str) -> str:
    norm = value.strip().lower()
    if not _MAC_PREFIX.fullmatch(norm):
        raise InvalidInput(variable, f"{value!r} is not a MAC prefix (xx:xx:xx)")
    return norm


def ip_address(variable: str, value: str) -> IPAddress:
    if "%" in value:
        raise InvalidInput(variable, f"{value!r} has a scope; give a global address")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidInput(variable, f"{value!r} is not an IPv4 or IPv6 address") from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
        raise InvalidInput(variable, f"{value!r} is not a unicast address")
    return addr


def ip_network(variable: str, value: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise InvalidInput(variable, f"{value!r} is not a network in CIDR form") from None
    if net.version != version:
        raise InvalidInput(variable, f"{value!r} is not an IPv{version} network")
    return net


def uuid(variable: str, value: str) -> str:
    try:
        parsed = uuidlib.UUID(value.strip())
    except ValueError:
        raise InvalidInput(variable, f"{value!r} is not a UUID") from None
    if str(parsed) != value.strip().lower():
        raise InvalidInput(variable, f"{value!r} is not a UUID in the usual 8-4-4-4-12 form")
    return str(parsed)


def index(variable: str, value: str) -> int:
    if not value.isdigit() or len(value) > 6:
        raise InvalidInput(variable, f"{value!r} is not a NIC index (a small non-negative number)")
    return int(value)


def instance(variable: str, value: str) -> str:
    if not _INSTANCE.fullmatch(value):
        raise InvalidInput(variable, f"{value!r} is not an instance name (letters, digits, '.', '_', '-')")
    return value


def tags(variable: str, value: str) -> tuple[str, ...]:
    """Space-separated tags. `\\ ` (Ganeti's Xen NIC file quoting) separates too:
    Ganeti tags never contain a backslash, so this cannot merge or split a real tag."""
    words = value.replace("\\ ", " ").split()
    for word in words:
        if not _TAG.fullmatch(word):
            raise InvalidInput(variable, f"tag {word!r} is not a valid Ganeti tag")
    return tuple(words)


def free_text(variable: str, value: str, limit: int = 128) -> str:
    _printable(variable, value)
    if len(value) > limit:
        raise InvalidInput(variable, f"is longer than {limit} characters")
    return value


def table(variable: str, value: str) -> str:
    """A routing table: a number in 1..2^32-1 or a name as rt_tables would hold it."""
    if value.isdigit():
        if not 0 < int(value) < 2**32:
            raise InvalidInput(variable, f"table {value} is out of range 1..4294967295")
        return str(int(value))
    if not _TABLE_NAME.fullmatch(value):
        raise InvalidInput(variable, f"{value!r} is neither a table number nor a table name")
    return value
