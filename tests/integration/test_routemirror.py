"""The hook server's copy of the routes (nichooks/host/routemirror.py) against the
kernel, in a namespace of the test: after any mix of adds, deletes, replaces, tables
and families, devices going down or away, and after the event socket overflowed, each
table's copy is the table."""

from __future__ import annotations

import json
import sys

from tests.support.netns import Netns

PROBE = r"""
import json, socket, subprocess, sys
from pyroute2 import IPRoute
from nichooks.host.routemirror import RouteMirror
from nichooks.host.netlink import _route_dicts

def ip(*args):
    subprocess.run(["ip", *args], check=True)

def batch(lines):
    subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)

def kernel(family, table):
    with IPRoute() as ipr:
        return _route_dicts(ipr.route("dump", family=family, table=table), table)

def norm(routes):
    return sorted(json.dumps(r, sort_keys=True) for r in routes)

def same(mirror, tables):
    mirror.drain()
    return all(norm(mirror.table(f, t)) == norm(kernel(f, t)) for f in (2, 10) for t in tables)

rcvbuf = int(sys.argv[1])
ip("link", "add", "a0", "type", "veth", "peer", "name", "a1")
ip("link", "add", "b0", "type", "veth", "peer", "name", "b1")
for dev in ("a0", "a1", "b0", "b1"):
    ip("link", "set", dev, "up")
ip("addr", "add", "198.51.100.2/24", "dev", "a0")
ip("-6", "addr", "add", "2001:db8::2/64", "dev", "a0", "nodad")
mirror = RouteMirror(rcvbuf=rcvbuf)
tables = (100, 200, 254)
results = {}
ip("route", "add", "default", "via", "198.51.100.1", "table", "100")
ip("route", "add", "10.0.0.1/32", "dev", "a0", "table", "100", "proto", "241")
ip("route", "add", "10.0.0.2/32", "dev", "b0", "table", "200", "proto", "241")
ip("-6", "route", "add", "2001:db8:1::1/128", "dev", "a0", "table", "100", "proto", "241")
results["added"] = same(mirror, tables)
ip("route", "replace", "10.0.0.1/32", "dev", "b0", "table", "100", "proto", "241")
ip("-6", "route", "replace", "2001:db8:1::1/128", "dev", "b0", "table", "100", "proto", "241")
results["replaced"] = same(mirror, tables)
ip("route", "append", "10.0.0.1/32", "dev", "a0", "table", "100", "proto", "241")
results["appended"] = same(mirror, tables)
ip("route", "del", "10.0.0.1/32", "dev", "a0", "table", "100")
results["one of two deleted"] = same(mirror, tables)
ip("route", "add", "10.5.5.5/32", "dev", "a0", "table", "100", "scope", "host")
ip("route", "del", "10.0.0.2/32", "table", "200")
ip("-6", "route", "del", "2001:db8:1::1/128", "table", "100")
ip("link", "del", "b0")   # IPv4 drops its routes without an event per route
results["deleted"] = same(mirror, tables)
batch([f"route add 10.1.{i // 250}.{i % 250}/32 dev a0 table 100 proto 241" for i in range(3000)])
results["burst"] = same(mirror, tables)
ip("link", "set", "a0", "down")   # IPv4 drops a0's routes without an event, not scope host
results["down"] = same(mirror, tables)
ip("link", "set", "a0", "up")
results["up"] = same(mirror, tables)
results["valid"] = mirror.valid
print(json.dumps(results))
"""


ALL = dict.fromkeys(("added", "replaced", "appended", "one of two deleted", "deleted", "burst",
                     "down", "up", "valid"), True)


def probe(ns: Netns, rcvbuf: int) -> dict[str, bool]:
    run = ns.run(sys.executable, "-c", PROBE, str(rcvbuf), check=False, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_copy_is_the_kernel(netns: Netns) -> None:
    assert probe(netns, 8 << 20) == ALL


def test_the_copy_survives_an_overflow(netns: Netns) -> None:
    """A receive buffer far too small for a burst of 3000 routes: the events are lost
    (ENOBUFS), the copy dumps again, and is the kernel's once more."""
    assert probe(netns, 4096) == ALL
