"""libnftables through Debian's Python binding (package python3-nftables), JSON only.

Why the binding rather than `nft -j -f -`: a call is a library call on one netlink
socket, with no fork and exec per batch, and the agent imports it once for every call
it serves. The binding is a small ctypes wrapper that is not on PyPI, so it is loaded
deliberately from Debian's directory, by file, and nothing else from there: a `.pth`
pointing at dist-packages would put every Debian module on the virtualenv's path.

Every command is a JSON object built by host/nftrules.py from typed values; no rule
text is ever written here. One `run` is one kernel transaction: it all applies, or
none of it does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from nichooks.errors import PlumbingError

BINDING = Path("/usr/lib/python3/dist-packages/nftables")
PACKAGE = "python3-nftables"
_module: list[Any] = []  # the binding, once loaded


class NftError(Exception):
    """libnftables refused a command; `text` is its first error line."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    @property
    def absent(self) -> bool:
        """The table, chain or map does not exist."""
        return "No such file or directory" in self.text


def unavailable(detail: str) -> PlumbingError:
    return PlumbingError(f"nftables filtering needs libnftables' Python binding ({detail}): "
                         f"apt-get install {PACKAGE}, or set NICHOOKS_ANTISPOOF=off",
                         step="nftables")


def binding() -> Any:
    """The binding's module, loaded from BINDING on first use."""
    if _module:
        return _module[0]
    import importlib.util

    init = BINDING / "__init__.py"
    if not init.is_file():
        raise unavailable(f"{BINDING} is missing")
    spec = importlib.util.spec_from_file_location("nftables", init,
                                                  submodule_search_locations=[str(BINDING)])
    if spec is None or spec.loader is None:
        raise unavailable(f"{init} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nftables"] = module  # its __init__ imports nftables.nftables
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop("nftables", None)
        raise unavailable(f"{init}: {exc}") from None
    _module.append(module)
    return module


def _first_error(text: str) -> str:
    lines = [line.split("Error: ", 1)[-1] for line in text.splitlines() if "Error" in line]
    return lines[0] if lines else (text.strip().splitlines() or ["libnftables failed"])[0]


class Nft:
    """One libnftables context (one netlink socket) in the caller's network namespace."""

    def __init__(self) -> None:
        self._ctx: Any = None

    @property
    def ctx(self) -> Any:
        if self._ctx is None:
            try:
                ctx = binding().Nftables()
            except OSError as exc:  # libnftables.so.1 itself missing
                raise unavailable(str(exc)) from None
            ctx.set_json_output(True)
            ctx.set_handle_output(True)
            self._ctx = ctx
        return self._ctx

    def run(self, cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply `cmds` as one transaction; the objects a `list` returned (no metainfo)."""
        rc, out, err = self.ctx.json_cmd({"nftables": cmds})
        if rc != 0:
            raise NftError(_first_error(str(err)))
        items = out.get("nftables", []) if isinstance(out, dict) else []
        return [item for item in items if "metainfo" not in item]

    def chain_rules(self, family: str, table: str, chain: str) -> list[dict[str, Any]] | None:
        """The chain's rules, or None if the table or chain does not exist."""
        try:
            found = self.run([{"list": {"chain": {"family": family, "table": table, "name": chain}}}])
        except NftError as exc:
            if exc.absent:
                return None
            raise
        return [item["rule"] for item in found if "rule" in item]

    def map_elements(self, family: str, table: str, name: str) -> dict[str, str] | None:
        """A verdict map's `ifname -> goto target`, or None if the map does not exist."""
        try:
            found = self.run([{"list": {"map": {"family": family, "table": table, "name": name}}}])
        except NftError as exc:
            if exc.absent:
                return None
            raise
        out: dict[str, str] = {}
        for item in found:
            for elem in item.get("map", {}).get("elem", []):
                if isinstance(elem, list) and len(elem) == 2 and isinstance(elem[1], dict):
                    target = (elem[1].get("goto") or elem[1].get("jump") or {}).get("target")
                    out[str(elem[0])] = str(target)
        return out

    def chains(self, family: str, table: str) -> list[str] | None:
        """Every chain's name in `table`, or None if there is no such table. Lists the
        family's chains, not the table: listing a table fetches every rule in it."""
        found = self.run([{"list": {"chains": {"family": family}}}])
        names = [str(item["chain"]["name"]) for item in found
                 if "chain" in item and item["chain"].get("table") == table]
        if names:
            return names
        tables = self.run([{"list": {"tables": {"family": family}}}])
        return [] if any(item.get("table", {}).get("name") == table for item in tables) else None

    def close(self) -> None:
        """The binding frees its context (and closes its socket) when the object goes:
        now, or at the exit of a served call's process (host/closing.py)."""
        from nichooks.host.closing import release

        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            release(ctx, lambda: None)
