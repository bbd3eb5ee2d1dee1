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
    no '/', ':' or whitespace; and ASCII, checked before the length: a value that
    came from undecodable bytes (a lone surrogate, as Python decodes the environment
    and argv) cannot even be encoded to count its bytes."""
    if not value:
        raise InvalidInput(variable, "is empty")
    _printable(variable, value)
    if value in (".", ".."):
        raise InvalidInput(variable, f"{value!r} is not a valid interface name")
    for bad in "/: \t\n\r\x0b\x0c":
        if bad in value:
            raise InvalidInput(variable, f"{value!r} contains {bad!r}, not allowed in an interface name")
    if not value.isascii():
        raise InvalidInput(variable, f"{value!r} is not ASCII")
    if len(value) >= IFNAMSIZ:
        raise InvalidInput(variable, f"{value!r} is longer than {IFNAMSIZ - 1} bytes")
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


LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def ip_address(variable: str, value: str) -> IPAddress:
    """A guest's unicast address. Refused besides garbage: a scope (``fe80::1%eth0``:
    Python's ipaddress accepts it, but a route or a proxy entry cannot carry it),
    unspecified, loopback, multicast, the limited broadcast (a /32 route to it would
    swallow every local broadcast), and an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``
    is how a socket shows an IPv4 peer, never an address a guest has on the wire)."""
    if "%" in value:
        raise InvalidInput(variable, f"{value!r} has a scope; give a global address")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidInput(variable, f"{value!r} is not an IPv4 or IPv6 address") from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr == LIMITED_BROADCAST:
        raise InvalidInput(variable, f"{value!r} is not a unicast address")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise InvalidInput(variable, f"{value!r} is an IPv4-mapped IPv6 address; give "
                           f"{addr.ipv4_mapped} as an IPv4 address")
    return addr


def ip_network(variable: str, value: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network in CIDR form. A scope is refused as for addresses: Python 3.11's
    ipaddress accepts ``2001:db8::%eth0/64`` and keeps the scope in every address it
    derives from the network (the EUI-64 address of routed mode)."""
    if "%" in value:
        raise InvalidInput(variable, f"{value!r} has a scope; give a global network")
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


_ASCII_DIGITS = re.compile(r"[0-9]+")


def index(variable: str, value: str) -> int:
    """ASCII digits only: str.isdigit() is also true for '²' or '١', which int()
    then refuses (or, for Arabic-Indic digits, quietly accepts)."""
    if not _ASCII_DIGITS.fullmatch(value) or len(value) > 6:
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
    """A routing table: a number in 1..2^32-1 or a name as rt_tables would hold it.
    The number is ASCII digits, range-checked on the string first: int() of a string
    of thousands of digits raises ValueError past Python's digit limit."""
    if _ASCII_DIGITS.fullmatch(value):
        significant = value.lstrip("0")
        if len(significant) > 10 or not 0 < int(significant or "0") < 2**32:
            raise InvalidInput(variable, f"table {value[:20]}{'...' if len(value) > 20 else ''} "
                               "is out of range 1..4294967295")
        return str(int(significant))
    if not _TABLE_NAME.fullmatch(value):
        raise InvalidInput(variable, f"{value!r} is neither a table number nor a table name")
    return value
