"""Throwaway network namespaces for integration tests, and what we observe in them.

Observation deliberately goes through `ip -j` rather than nichooks' own pyroute2
code: a test that read state through the code under test could not catch that
code misreading it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from typing import Any

from tests.support import served

PREFIX = "nht-"
# Every namespace this test process made: the session guard checks these are gone
# (not "no nht-* exists", which another test run on the same machine could break).
CREATED: set[str] = set()


class Netns:
    """One network namespace made by a test, removed by it."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or PREFIX + secrets.token_hex(4)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        CREATED.add(self.name)
        self.ip("link", "set", "lo", "up")

    def delete(self) -> None:
        served.stop(self.name)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def run(self, *argv: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a program inside the namespace (with its own /sys, as hooks see it)."""
        if argv and served.is_hook(argv[0]):
            served.ensure(self.name, env)
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], env=env,
                              capture_output=True, text=True, check=check, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def ip(self, *args: str, check: bool = True, input_text: str | None = None) -> str:
        r = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True,
                           input=input_text)
        if check and r.returncode != 0:
            raise AssertionError(f"ip -n {self.name} {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def ipj(self, *args: str) -> Any:
        out = subprocess.run(["ip", "-j", "-n", self.name, *args], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out) if out.strip() else []

    def link(self, name: str) -> dict[str, Any]:
        """One link as `ip -j -d link show` reports it; AssertionError if absent."""
        found = self.ipj("-d", "link", "show", "dev", name)
        assert found, f"{name} not found in {self.name}"
        link: dict[str, Any] = found[0]
        return link

    def links(self) -> dict[str, dict[str, Any]]:
        """Every link as `ip -j -d link show` reports it, by name."""
        return {link["ifname"]: link for link in self.ipj("-d", "link", "show")}

    def has_link(self, name: str) -> bool:
        return any(link["ifname"] == name for link in self.ipj("link", "show"))

    def sysctl(self, key: str) -> str:
        return self.run("sysctl", "-n", key).stdout.strip()

    def snapshot(self) -> dict[str, Any]:
        """Everything a hook may touch, in a form two snapshots can be compared in."""
        links = []
        for link in self.ipj("-d", "link", "show"):
            links.append({
                "ifname": link["ifname"],
                "mtu": link.get("mtu"),
                "address": link.get("address"),
                "master": link.get("master"),
                "up": "UP" in link.get("flags", []),
                "kind": link.get("linkinfo", {}).get("info_kind"),
            })
        snap: dict[str, Any] = {"links": sorted(links, key=lambda x: x["ifname"])}
        # IPv6 link-local addresses and their routes, and route "linkdown" flags, follow
        # a link's carrier, which the kernel updates asynchronously (a bridge gains it
        # with its first running port): kernel-derived, never made by a hook.
        snap["addrs"] = sorted(
            (a["ifname"], i["local"], i["prefixlen"])
            for a in self.ipj("addr", "show") for i in a.get("addr_info", [])
            if not (i.get("family") == "inet6" and i.get("scope") == "link"))
        for fam in ("-4", "-6"):
            snap[f"rules{fam}"] = self.ipj(fam, "rule", "show")
            routes = []
            for r in self.ipj(fam, "route", "show", "table", "all"):
                if r.get("dst", "").startswith("fe80:") or r.get("dst") == "ff00::/8":
                    continue
                r.pop("flags", None)
                routes.append(json.dumps(r, sort_keys=True))
            snap[f"routes{fam}"] = sorted(routes)
            snap[f"proxy{fam}"] = self.ip(fam, "neigh", "show", "proxy")
        out = subprocess.run(["bridge", "-j", "-n", self.name, "vlan", "show"],
                             capture_output=True, text=True).stdout
        snap["bridge_vlans"] = json.loads(out) if out.strip() else []
        snap["nftables"] = self.nft_ruleset()
        return snap

    def nft_ruleset(self) -> list[dict[str, Any]]:
        """The namespace's nftables ruleset (`nft -j list ruleset`), without handles."""
        out = self.run("nft", "-j", "list", "ruleset").stdout
        items = json.loads(out).get("nftables", []) if out.strip() else []
        for item in items:
            for obj in item.values():
                if isinstance(obj, dict):
                    obj.pop("handle", None)
        return [item for item in items if "metainfo" not in item]

    def nft_table(self, family: str, table: str = "nichooks") -> dict[str, Any] | None:
        """`family table` as `nft -j list ruleset` shows it: its chains, its sets and maps
        (name -> type), and the map `nics` (tap -> goto target); None if there is no such
        table."""
        items = self.nft_ruleset()
        if not any(i.get("table", {}).get("family") == family and i["table"].get("name") == table
                   for i in items):
            return None

        def mine(kind: str) -> list[dict[str, Any]]:
            return [i[kind] for i in items if kind in i and i[kind].get("family") == family
                    and i[kind].get("table") == table]

        elements: dict[str, str] = {}
        for m in mine("map"):
            for key, verdict in m.get("elem", []) if m.get("name") == "nics" else []:
                target = (verdict.get("goto") or verdict.get("jump") or {}).get("target")
                elements[str(key)] = str(target)
        return {"chains": sorted(c["name"] for c in mine("chain")),
                "sets": {s["name"]: s.get("type") for s in mine("set")},
                "maps": sorted(m["name"] for m in mine("map")),
                "elements": elements}


def list_netns() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return {n["name"] for n in json.loads(out)} if out.strip() else set()


def root_links() -> list[tuple[str, str | None]]:
    """The root namespace's links: tests assert they never change."""
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout
    return sorted((link["ifname"], link.get("master")) for link in json.loads(out))


def require_root() -> None:
    import pytest

    if os.geteuid() != 0:
        pytest.skip("integration tests need root (network namespaces)")
