"""The other NICs a benchmark host carries, made in bulk, so that a figure shows
whether a plug's cost grows with the host's size. Shared by the benchmarks."""

from __future__ import annotations

UPLINK = ["link add up0 type veth peer name up1", "link set up0 up", "link set up1 up",
          "addr add 198.51.100.2/24 dev up0"]


def routed_uplink(table: str) -> list[str]:
    """`ip -batch` lines: an uplink veth holding the table's default route."""
    return [*UPLINK, f"route add default via 198.51.100.1 table {table}"]


def routed_nics(count: int, table: str) -> list[str]:
    """`ip -batch` lines for `count` routed NICs as a plug leaves them: tap, rule, host
    route in `table`, proxy entry on the uplink up0."""
    lines: list[str] = []
    for i in range(count):
        tap, addr = f"t{i}", f"10.{i // 250}.{i % 250}.1"
        lines += [f"link add {tap} type veth peer name p{i}", f"link set {tap} up",
                  f"rule add iif {tap} lookup {table} priority 20000",
                  f"route add {addr}/32 dev {tap} table {table} proto 241",
                  f"neigh add proxy {addr} dev up0"]
    return lines


def ovs_ports(count: int, bridge: str = "br0") -> list[str]:
    """`ovs-vsctl` arguments adding `count` internal ports to `bridge` in one call."""
    args: list[str] = []
    for i in range(count):
        args += ["--", "add-port", bridge, f"p{i}", "--", "set", "interface", f"p{i}",
                 "type=internal"]
    return args
