"""Ganeti's VLAN syntax, parsed once into a value every backend can trust.

Ganeti documents three shapes for the ``vlan`` NIC parameter:
access ``n`` or ``.n``, trunk ``:n[:n...]`` and hybrid ``.n:n[:n...]`` (the same
syntax as Xen's ``vif-openvswitch`` bridge suffix). Only ``gnt-instance add``
validates and normalises it; ``gnt-instance modify``, RAPI and ``gnt-network
connect`` pass the string through untouched, so a hook also sees ``100:200``
(a bare untagged id followed by trunks). The stock shell script slices the string
with parameter expansions and gets ``.100`` wrong (it becomes an invalid trunk);
parsing into ``VlanSpec`` here means the Linux-bridge and Open vSwitch code never
look at the string again and cannot disagree about what it meant.
"""

from __future__ import annotations

from dataclasses import dataclass

from nichooks.errors import InvalidInput

VLAN_MIN = 1
VLAN_MAX = 4094
"""802.1Q ids 0 and 4095 are reserved; Linux bridges and OVS refuse them too."""

MAX_TEXT_LEN = 20480
"""Every id 1..4094 once, with separators, is 19 363 characters: anything longer is
not a VLAN list but garbage, and is refused before any work is done on it."""

_DIGITS = frozenset("0123456789")


@dataclass(frozen=True)
class VlanSpec:
    """The VLANs of one NIC: an untagged (access / PVID) id and tagged trunk ids.

    ``VlanSpec(None, ())`` means "no VLAN configured" (what ``""`` means to Ganeti),
    although ``parse_vlan("")`` returns ``None`` so callers can test for it
    cheaply. The constructor enforces the invariants ``parse_vlan`` establishes,
    so that a spec built elsewhere (a journal, a test) can always be turned back
    into Ganeti syntax and parsed to the same value.
    """

    access: int | None
    trunks: tuple[int, ...]

    def __post_init__(self) -> None:
        ids = list(self.trunks)
        if self.access is not None:
            ids.append(self.access)
        for vid in ids:
            if isinstance(vid, bool) or not isinstance(vid, int) or not VLAN_MIN <= vid <= VLAN_MAX:
                raise ValueError(f"VLAN id {vid!r} is not in {VLAN_MIN}..{VLAN_MAX}")
        if not isinstance(self.trunks, tuple):
            raise ValueError("trunks must be a tuple")
        if len(set(self.trunks)) != len(self.trunks):
            raise ValueError("duplicate trunk ids")
        if self.access is not None and self.access in self.trunks:
            raise ValueError(f"VLAN {self.access} is both untagged and tagged")

    @property
    def ovs_vlan_mode(self) -> str | None:
        """The Open vSwitch ``vlan_mode`` this spec needs, or None for no VLAN.

        Spelled out because OVS infers the mode from ``tag``/``trunks`` otherwise,
        and a port with a tag plus trunks and no mode is an *access* port that
        drops the tagged traffic the hybrid spec asked for.
        """
        if self.access is None:
            return "trunk" if self.trunks else None
        return "native-untagged" if self.trunks else "access"

    def canonical(self) -> str:
        """The spec in the normalised Ganeti syntax (``.100``, ``:100:200``,
        ``.100:200``, or ``""``), e.g. for logs and for passing on to custom scripts
        that parse the variable themselves."""
        head = "" if self.access is None else f".{self.access}"
        return head + "".join(f":{vid}" for vid in self.trunks)


def parse_vlan(text: str, variable: str = "VLAN") -> VlanSpec | None:
    """Parse Ganeti's VLAN string; None means no VLAN.

    Accepts ``""``, ``100``, ``.100``, ``:100:200``, ``.100:200:300`` and
    ``100:200`` (same as ``.100:200``). Duplicate trunk ids are collapsed, keeping
    the first occurrence, since a trunk is a set and Ganeti never validated it.
    Everything else raises :class:`InvalidInput` naming ``variable``.
    """
    if text == "":
        return None
    if len(text) > MAX_TEXT_LEN:
        raise InvalidInput(variable, f"too long ({len(text)} characters, at most {MAX_TEXT_LEN})")
    if text.startswith(":"):
        access_part: str | None = None
        trunk_parts = text[1:].split(":")
    else:
        head, _, rest = text.partition(":")
        access_part = head[1:] if head.startswith(".") else head
        trunk_parts = rest.split(":") if rest or text.endswith(":") else []

    access = None if access_part is None else _vlan_id(access_part, text, variable)
    trunks: dict[int, None] = {}  # an ordered set
    for part in trunk_parts:
        vid = _vlan_id(part, text, variable)
        if vid == access:
            raise InvalidInput(variable, f"{text!r}: VLAN {vid} cannot be both untagged and tagged")
        trunks[vid] = None
    return VlanSpec(access, tuple(trunks))


def _vlan_id(part: str, text: str, variable: str) -> int:
    """One element of the list: ASCII digits only (no sign, blank or Unicode digit,
    which ``int()`` would quietly accept), in range."""
    if part == "":
        raise InvalidInput(
            variable,
            f"{text!r}: empty VLAN id (expected n, .n, :n[:n...] or .n:n[:n...])",
        )
    if not set(part) <= _DIGITS:
        raise InvalidInput(
            variable,
            f"{text!r}: {part!r} is not a VLAN id (expected n, .n, :n[:n...] or .n:n[:n...])",
        )
    # Checked on the string first: int() of thousands of digits is slow and, past
    # Python's digit limit, raises ValueError instead of giving a number.
    significant = part.lstrip("0")
    vid = int(significant) if 0 < len(significant) <= 4 else -1
    if not VLAN_MIN <= vid <= VLAN_MAX:
        raise InvalidInput(
            variable,
            f"{text!r}: VLAN id {part} is out of range {VLAN_MIN}..{VLAN_MAX}",
        )
    return vid
