"""The state directory, read with plain file reads, never through nichooks' Store:

    nics/<key>.json   a NIC's journal (key: its UUID, or UUID-<suffix> for a second
                      device of the NIC such as Xen's emulated tap)
    taps/<tap>        the tap index: the key of the NIC plugged on <tap>
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

KEY_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(-[a-z0-9]{1,16})?")


def names_in(state: Path, sub: str) -> list[str]:
    """The names in `state`/`sub` ("nics": the journals, "taps": the tap index, "tmp"),
    sorted; none when it is not a directory. Reads no file: safe to poll while a hook
    writes, and on a state directory of any shape."""
    d = state / sub
    try:
        return sorted(os.listdir(d))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # a hostile setting: no such directory can exist
            return []
        raise


def journal_path(state: Path, key: str) -> Path:
    return state / "nics" / f"{key}.json"


def journals(state: Path) -> list[dict[str, Any]]:
    """Every journal, parsed, in file name order. Asserts that nics/ holds nothing but
    journals named after the key they hold (format 1, a list of records)."""
    found = []
    for name in names_in(state, "nics"):
        path = state / "nics" / name
        assert name.endswith(".json") and KEY_RE.fullmatch(name[:-5]), f"unexpected file in nics/: {name}"
        try:
            data = json.loads(path.read_bytes())
        except ValueError as exc:
            raise AssertionError(f"corrupt journal {path}: {exc}") from None
        assert isinstance(data, dict) and data.get("format") == 1, f"{path}: {data!r:.200}"
        assert data["key"] == name[:-5], f"{path} holds key {data['key']}"
        assert isinstance(data["records"], list), f"{path}: records {data['records']!r:.200}"
        found.append(data)
    return found


def tap_index(state: Path) -> dict[str, str]:
    """The tap index: tap -> the key its entry names."""
    return {name: (state / "taps" / name).read_text().strip() for name in names_in(state, "taps")}
