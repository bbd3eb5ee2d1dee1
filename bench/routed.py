"""Routed-mode ifup/ifdown timings, side by side with the same work as plain `ip` commands.

Not a test: it prints figures. Everything happens in a throwaway network namespace,
with 0, 100 and 1000 other routed NICs present (their taps, rules, host routes and
uplink proxy entries made in bulk with `ip -batch`), so the figures show whether a
plug's cost grows with the host's size. Run as root:

    .venv/bin/python bench/routed.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crowd import routed_nics, routed_uplink

BIN = Path(sys.executable).parent
TABLE = "100"
NS = f"nichooks-bench-{os.getpid()}"


def sh(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def inside(*argv: str) -> list[str]:
    return ["ip", "netns", "exec", NS, *argv]


def setup(others: int) -> None:
    sh("ip", "netns", "add", NS)
    batch = ["link set lo up", *routed_uplink(TABLE), "link add tapb type veth peer name gb",
             *routed_nics(others, TABLE)]
    sh("ip", "-n", NS, "-batch", "-", stdin="\n".join(batch) + "\n")
    sh(*inside("sysctl", "-qw", "net.ipv4.ip_forward=1"))


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


IP_UP = [
    ["ip", "link", "set", "tapb", "up"],
    ["sysctl", "-qw", "net.ipv4.conf.tapb.proxy_arp=1", "net.ipv4.conf.tapb.forwarding=1"],
    ["ip", "rule", "add", "iif", "tapb", "lookup", TABLE, "priority", "20000"],
    ["ip", "route", "add", "203.0.113.9/32", "dev", "tapb", "table", TABLE, "proto", "241"],
    ["ip", "neigh", "add", "proxy", "203.0.113.9", "dev", "up0"],
]
IP_DOWN = [
    ["ip", "neigh", "del", "proxy", "203.0.113.9", "dev", "up0"],
    ["ip", "route", "del", "203.0.113.9/32", "dev", "tapb", "table", TABLE],
    ["ip", "rule", "del", "iif", "tapb", "lookup", TABLE, "priority", "20000"],
    ["sysctl", "-qw", "net.ipv4.conf.tapb.proxy_arp=0", "net.ipv4.conf.tapb.forwarding=0"],
    ["ip", "link", "set", "tapb", "down"],
]


def ip_script(cmds: list[list[str]]) -> float:
    start = time.perf_counter()
    for cmd in cmds:
        subprocess.run(inside(*cmd), check=True, capture_output=True)
    return time.perf_counter() - start


def measure(others: int, runs: int) -> dict[str, list[float]]:
    state = tempfile.mkdtemp(prefix="nichooks-bench-")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NICHOOKS_STATE_DIR": state,
           "NICHOOKS_ANNOUNCE": "0", "MODE": "routed", "LINK": TABLE, "IP": "203.0.113.9",
           "MAC": "aa:00:00:00:00:09", "INTERFACE": "tapb", "INSTANCE": "bench",
           "INTERFACE_UUID": "6b1a2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"}
    out: dict[str, list[float]] = {"nichooks ifup": [], "nichooks ifdown": [],
                                   "ip ifup": [], "ip ifdown": []}
    try:
        setup(others)
        for _ in range(runs):
            out["nichooks ifup"].append(timed(inside(str(BIN / "kvm-ifup"), "tapb"), env))
            out["nichooks ifdown"].append(timed(inside(str(BIN / "kvm-ifdown"), "tapb"), env))
            out["ip ifup"].append(ip_script(IP_UP))
            out["ip ifdown"].append(ip_script(IP_DOWN))
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/routed.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    print(f"routed mode, {args.runs} runs each, milliseconds (min / median)")
    print(f"{'other NICs':>10} | {'nichooks ifup':>15} | {'ip ifup':>15} | "
          f"{'nichooks ifdown':>15} | {'ip ifdown':>15}")
    for others in (0, 100, 1000):
        r = measure(others, args.runs)

        def cell(key: str, r: dict[str, list[float]] = r) -> str:
            return f"{min(r[key]) * 1000:6.1f} / {statistics.median(r[key]) * 1000:6.1f}"

        print(f"{others:>10} | {cell('nichooks ifup'):>15} | {cell('ip ifup'):>15} | "
              f"{cell('nichooks ifdown'):>15} | {cell('ip ifdown'):>15}", flush=True)
    print("(the `ip` column runs the same five operations as separate commands, as a shell "
          "hook does)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
