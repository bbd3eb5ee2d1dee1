"""nichooks' kvm-ifup / kvm-ifdown timed against Ganeti's stock kvm-ifup, run for run.

Not a test: it prints figures. Ganeti's stock `kvm-ifup` (a shell script sourcing
`net-common`) comes from Debian's `ganeti` package, fetched with `apt-get download`
and unpacked with `dpkg -x`, never installed; the unpacked tree is cached in
/var/cache/nichooks-bench. The stock script runs from a temp copy whose `source`
line points at the unpacked `net-common`, with SYSCONFDIR / LOCALSTATEDIR pointing
at empty temp dirs, so no site hook (`/etc/ganeti/kvm-vif-bridge`, ...) can run.

For each mode (bridged: a Linux bridge; routed: a routing table whose default route
goes out an uplink veth; openvswitch: a private userspace OVS, as bench/ovs.py) with
0 and 1000 other NICs, a throwaway network namespace is built, then pairs run
interleaved: stock kvm-ifup, then nichooks' kvm-ifup and kvm-ifdown, each on a fresh
veth end playing the tap, inside the namespace (`ip netns exec`), with the
environment Ganeti builds. The stock script has no ifdown: its work is undone with
ip / ovs-vsctl commands, untimed. The root namespace is never touched.

In bridged and routed mode the other NICs are filtered NICs, as nichooks' plugs leave
them on a host where every NIC is filtered: besides their taps (and, routed, their
rules, host routes and proxy entries), each has its nftables chain `nic-<key>` and its
element in the `nics` verdict map of table `nichooks` (family bridge / inet), all
built with nichooks.host.nftrules and loaded in one `nft -j -f` transaction, so the
figures show whether a plug's cost stays flat with 1000 filters. The openvswitch
others are bare internal ports, with no flows.

Fairness: Ganeti's stock script filters nothing, while nichooks' kvm-ifup installs the
NIC's nftables filter (and its kvm-ifdown removes it) by default (NICHOOKS_ANTISPOOF
=on; in openvswitch mode, its anti-spoofing flows). The timed runs keep that default,
since it is what users get: nichooks' figures include the filtering the stock script
does not do. `--antispoof off` sets NICHOOKS_ANTISPOOF=off for nichooks (its hooks
and its agent) and loads no filters for the others, as a host with filtering off has
none: the like-for-like comparison. Run as root:

    .venv/bin/python bench/vs_ganeti.py [--pairs N] [--modes bridged,routed]
        [--antispoof on|off] [--evacuate 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crowd import nft_filters, ovs_ports, routed_nics, routed_uplink
from serving import rss_mib

from tests.integration.agent_env import AgentProc
from tests.integration.ovs_env import Switch
from tests.support.hooks import bin_path
from tests.support.netns import Netns

CACHE = Path("/var/cache/nichooks-bench")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TAP, PEER = "tapb", "gb"
TABLE = "100"
IP4 = "203.0.113.9"
MAC = "aa:00:00:00:00:09"
UUID = "6b1a2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
OTHERS = (0, 1000)


# -- the stock scripts -------------------------------------------------------------------
@dataclass
class Stock:
    version: str          # e.g. "ganeti 3.0.2-3 (scripts from ganeti-3.0 3.0.2-3)"
    kvm_ifup: Path        # in the unpacked package
    net_common: Path


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)


def _download(name: str, into: Path) -> Path:
    """`apt-get download NAME` into `into`; `apt-get update` once if that fails (no or
    stale package lists)."""
    r = _run(["apt-get", "download", name], cwd=into)
    if r.returncode != 0:
        print(f"apt-get download {name} failed ({r.stderr.strip().splitlines()[-1:]}); "
              "running apt-get update", file=sys.stderr)
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=True)
        r = _run(["apt-get", "download", name], cwd=into)
    if r.returncode != 0:
        raise RuntimeError(f"apt-get download {name}: {r.stderr.strip()}")
    base = name.split("=")[0]
    debs = sorted(into.glob(f"{base}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {name}: no {base}_*.deb in {into}")
    return debs[-1]


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def _candidate() -> str | None:
    """The `ganeti` version apt would fetch, from the local lists (no network)."""
    r = _run(["apt-cache", "show", "--no-all-versions", "ganeti"])
    found = re.search(r"^Version: (\S+)", r.stdout, re.M) if r.returncode == 0 else None
    return found.group(1) if found else None


def _find(root: Path, name: str) -> list[Path]:
    """Regular files (not the meta package's symlinks) called `name` under root."""
    return sorted(p for p in root.rglob(name) if p.is_file() and not p.is_symlink())


def _load(entry: Path) -> Stock:
    root = entry / "root"
    for ifup in _find(root, "kvm-ifup"):
        common = ifup.parent / "net-common"
        if common.is_file() and not common.is_symlink():
            return Stock((entry / "VERSION").read_text().strip(), ifup, common)
    raise RuntimeError(f"no kvm-ifup next to a net-common under {root}")


def fetch_stock() -> Stock:
    """Debian's ganeti scripts, unpacked (never installed), from the cache if there."""
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = sorted((p for p in CACHE.glob("ganeti_*") if (p / "VERSION").is_file()),
                    key=lambda p: p.stat().st_mtime)
    wanted = _candidate()
    for entry in reversed(cached):
        if wanted is None or entry.name == f"ganeti_{wanted}":
            return _load(entry)
    staging = Path(tempfile.mkdtemp(prefix="ganeti-", dir=CACHE))
    try:
        debs = staging / "debs"
        debs.mkdir()
        debs.chmod(0o755)  # apt-get download drops to _apt, which must reach the dir
        meta = _download("ganeti", debs)
        version = _field(meta, "Version")
        # On Debian the scripts live in the versioned package the meta package pins
        # (ganeti-3.0 (= 3.0.2-3)); the meta package holds only symlinks to them.
        pinned = re.search(r"(ganeti-[0-9][\w.]*) \(= ([^)]+)\)", _field(meta, "Depends"))
        parts = [meta]
        what = f"ganeti {version}"
        if pinned:
            parts.append(_download(f"{pinned.group(1)}={pinned.group(2)}", debs))
            what += f" (scripts from {pinned.group(1)} {pinned.group(2)})"
        for deb in parts:
            subprocess.run(["dpkg", "-x", str(deb), str(staging / "root")], check=True)
        shutil.rmtree(debs)
        (staging / "VERSION").write_text(what + "\n")
        entry = CACHE / f"ganeti_{version}"
        shutil.rmtree(entry, ignore_errors=True)
        staging.chmod(0o755)
        staging.rename(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _load(entry)


SOURCE_LINE = re.compile(r"^(\s*(?:source|\.)\s+)(\S*/net-common)\s*$", re.M)


def runnable_copy(stock: Stock, into: Path) -> Path:
    """The stock kvm-ifup copied into `into`, sourcing a copy of the unpacked
    net-common; any literal /etc/ganeti is pointed at an empty dir as well (the
    environment's SYSCONFDIR does that for net-common's CONF_DIR)."""
    empty = into / "etc" / "ganeti"
    empty.mkdir(parents=True)
    common = into / "net-common"
    text = stock.net_common.read_text()
    if "SYSCONFDIR:-" not in text:
        raise RuntimeError("net-common no longer takes SYSCONFDIR from the environment")
    common.write_text(text.replace("/etc/ganeti", str(empty)))
    script = stock.kvm_ifup.read_text()
    script, n = SOURCE_LINE.subn(lambda m: f"{m.group(1)}{common}", script)
    if n != 1:
        raise RuntimeError(f"expected one `source .../net-common` line in kvm-ifup, found {n}")
    ifup = into / "kvm-ifup"
    ifup.write_text(script.replace("/etc/ganeti", str(empty)))
    ifup.chmod(0o755)
    return ifup


# -- the worlds --------------------------------------------------------------------------
@dataclass
class World:
    """One mode's namespace with `others` other NICs; `plugged` probes the tap."""

    mode: str
    ns: Netns
    link: str
    plugged: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)       # for both scripts
    ours: dict[str, str] = field(default_factory=dict)      # nichooks' settings
    undo_stock: list[list[str]] = field(default_factory=list)
    switch: Switch | None = None


def _batch(ns: Netns, lines: list[str]) -> None:
    if lines:
        ns.ip("-batch", "-", input_text="\n".join(lines) + "\n")


def _master(ns: Netns) -> str | None:
    found = ns.ipj("link", "show", "dev", TAP)
    return found[0].get("master") if found else None


def load_filters(ns: Netns, count: int, family: str) -> None:
    """The `count` others' nftables filters in `family`, in one `nft -j -f`
    transaction; checked by counting the `nic-` chains of table nichooks."""
    if not count:
        return
    document = json.dumps(nft_filters(count, family))
    subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-j", "-f", "-"], input=document,
                   text=True, check=True, capture_output=True)
    listed = json.loads(ns.run("nft", "-j", "list", "chains", family).stdout)
    chains = [item["chain"]["name"] for item in listed.get("nftables", [])
              if "chain" in item and item["chain"]["table"] == "nichooks"]
    found = sum(name.startswith("nic-") for name in chains)
    if found != count:
        raise RuntimeError(f"{count} filters loaded in {family} nichooks, {found} nic- chains")


def tap_filtered(ns: Netns, family: str) -> bool:
    """Whether the `nics` map of table nichooks in `family` sends TAP somewhere."""
    r = ns.run("nft", "-j", "list", "map", family, "nichooks", "nics", check=False)
    if r.returncode != 0:
        return False  # no table: nothing filtered
    for item in json.loads(r.stdout).get("nftables", []):
        if any(isinstance(e, list) and e[0] == TAP for e in item.get("map", {}).get("elem", [])):
            return True
    return False


def build_bridged(ns: Netns, others: int, _root: Path, filtered: bool = True) -> World:
    batch = ["link add br0 type bridge", "link set br0 address 02:00:00:00:00:01",
             "link set br0 up"]
    for i in range(others):
        batch += [f"link add t{i} type veth peer name p{i}", f"link set t{i} master br0",
                  f"link set t{i} up"]
    _batch(ns, batch)
    if filtered:
        load_filters(ns, others, "bridge")
    return World("bridged", ns, "br0", lambda: _master(ns) == "br0")


def build_routed(ns: Netns, others: int, _root: Path, filtered: bool = True) -> World:
    batch = [*routed_uplink(TABLE), *routed_nics(others, TABLE)]
    _batch(ns, batch)
    if filtered:
        load_filters(ns, others, "inet")
    # The host as an operator readies it for nichooks' routed mode (the stock script
    # checks none of these).
    ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
           "net.ipv6.conf.up0.proxy_ndp=1", "net.ipv6.conf.up0.accept_ra=0")

    def plugged() -> bool:
        return bool(ns.ipj("route", "show", "table", TABLE, "exact", f"{IP4}/32", "dev", TAP))

    undo = [["ip", "-n", ns.name, "rule", "del", "iif", TAP, "table", TABLE]]
    return World("routed", ns, TABLE, plugged, undo_stock=undo)


def build_ovs(ns: Netns, others: int, root: Path, _filtered: bool = True) -> World:
    sw = Switch(ns, root)
    world = World("openvswitch", ns, "br0", lambda: TAP in sw.ports("br0"), switch=sw)
    try:
        sw.start()
        sw.add_bridge("br0")
        if others:
            sw.vsctl("--timeout=600", *ovs_ports(others))
    except BaseException:
        sw.stop()  # by pidfile: whatever of the two daemons had started
        raise
    # The stock script calls plain `ovs-vsctl`, which finds $OVS_RUNDIR/db.sock.
    world.env = {"OVS_RUNDIR": str(sw.dir)}
    world.ours = {"NICHOOKS_OVSDB": sw.db}
    world.undo_stock = [["ovs-vsctl", f"--db={sw.db}", "--if-exists", "del-port", TAP]]
    return world


BUILDERS: dict[str, Callable[[Netns, int, Path, bool], World]] = {
    "bridged": build_bridged, "routed": build_routed, "openvswitch": build_ovs}


# -- running -----------------------------------------------------------------------------
def fresh_tap(ns: Netns) -> None:
    ns.ip("link", "del", TAP, check=False)
    ns.ip("link", "add", TAP, "type", "veth", "peer", "name", PEER)


def timed(world: World, script: str, env: dict[str, str], tap: str = TAP) -> float:
    argv = ["ip", "netns", "exec", world.ns.name, script, tap]
    start = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{world.mode}: {script} {tap} exited {r.returncode}: "
                           f"{(r.stdout + r.stderr).strip()}")
    return seconds


def dirs(root: Path) -> None:
    for sub in ("state", "state-cold", "conf", "sysconf", "var"):
        (root / sub).mkdir(parents=True)
    (root / "state").chmod(0o700)
    (root / "state-cold").chmod(0o700)


def envs(world: World, root: Path, **nic: str) -> tuple[dict[str, str], dict[str, str],
                                                         dict[str, str]]:
    """(stock, nichooks served by the agent, nichooks without an agent): the second
    names the agent's state directory, the third one with no agent socket."""
    base = {"PATH": PATH, "LC_ALL": "C", "INSTANCE": "bench.example.org", "MODE": world.mode,
            "LINK": world.link, "IP": IP4, "MAC": MAC, "INTERFACE": TAP, "INTERFACE_INDEX": "0",
            "INTERFACE_UUID": UUID, "TAGS": "", **world.env, **nic}
    stock = {**base, "SYSCONFDIR": str(root / "sysconf"), "LOCALSTATEDIR": str(root / "var")}
    served = {**base, "NICHOOKS_STATE_DIR": str(root / "state"),
              "NICHOOKS_CONF_DIR": str(root / "conf"),
              "GANETI_RUN_DIR": str(root / "state" / "ganeti-run"), **world.ours}
    cold = {**served, "NICHOOKS_STATE_DIR": str(root / "state-cold"),
            "GANETI_RUN_DIR": str(root / "state-cold" / "ganeti-run")}
    return stock, served, cold


def antispoof_off(world: World, antispoof: str) -> None:
    """`--antispoof off`: NICHOOKS_ANTISPOOF=off in nichooks' environment (hooks and
    agent); `on` leaves nichooks' default, which is on."""
    if antispoof == "off":
        world.ours["NICHOOKS_ANTISPOOF"] = "off"


def measure(mode: str, others: int, pairs: int, stock_ifup: Path, tmp: Path,
            antispoof: str = "on") -> tuple[dict[str, list[float]], float]:
    """Interleaved: stock ifup; nichooks ifup + ifdown without an agent; the same
    served by the agent. Also the agent's resident memory at the end."""
    root = tmp / f"{mode}-{others}"
    dirs(root)
    out: dict[str, list[float]] = {k: [] for k in ("stock", "ifup", "ifdown", "ifup+a", "ifdown+a")}
    name = f"nichooks-bench-{os.getpid()}-{mode[:5]}"
    world: World | None = None
    agent: AgentProc | None = None
    rss = 0.0
    try:
        ns = Netns(name)
        world = BUILDERS[mode](ns, others, root, antispoof == "on")
        antispoof_off(world, antispoof)
        family = {"bridged": "bridge", "routed": "inet"}.get(mode)
        checked = False
        stock_env, served_env, cold_env = envs(world, root)
        agent = AgentProc(ns, served_env, root / "agent.log")
        agent.start()  # stopped in `finally` even when it does not start
        for _ in range(pairs):
            fresh_tap(ns)
            out["stock"].append(timed(world, str(stock_ifup), stock_env))
            if not world.plugged():
                raise RuntimeError(f"{mode}: stock kvm-ifup left {TAP} unplugged")
            for cmd in world.undo_stock:
                subprocess.run(cmd, capture_output=True, check=False)
            for suffix, env in (("", cold_env), ("+a", served_env)):
                fresh_tap(ns)
                out["ifup" + suffix].append(timed(world, bin_path("kvm-ifup"), env))
                if not world.plugged():
                    raise RuntimeError(f"{mode}: nichooks kvm-ifup left {TAP} unplugged")
                if family and not checked:  # once per world, untimed
                    if tap_filtered(ns, family) != (antispoof == "on"):
                        raise RuntimeError(f"{mode}: {TAP} filtered is not antispoof {antispoof}")
                    checked = True
                out["ifdown" + suffix].append(timed(world, bin_path("kvm-ifdown"), env))
                if world.plugged():
                    raise RuntimeError(f"{mode}: nichooks kvm-ifdown left {TAP} plugged")
        assert agent.proc is not None
        rss = rss_mib(agent.proc.pid)
    finally:
        if agent is not None:
            agent.stop()
        if world is not None and world.switch is not None:
            world.switch.stop()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return out, rss


def evacuate(stock_ifup: Path, tmp: Path, count: int, parallel: int,
             antispoof: str = "on") -> dict[str, float]:
    """`count` bridged ifups, `parallel` at a time, as a node evacuation brings them:
    wall seconds for the stock script, for nichooks served and without an agent; and
    the agent's memory with `count` NICs journaled."""
    root = tmp / "evacuation"
    dirs(root)
    name = f"nichooks-bench-{os.getpid()}-evac"
    out: dict[str, float] = {}
    agent: AgentProc | None = None
    try:
        ns = Netns(name)
        world = build_bridged(ns, 0, root)
        antispoof_off(world, antispoof)
        _batch(ns, [f"link add e{i} type veth peer name f{i}" for i in range(count)])
        calls = []
        for i in range(count):
            nic = {"INTERFACE": f"e{i}", "MAC": f"aa:00:00:{i // 65536:02x}:{i // 256 % 256:02x}:"
                   f"{i % 256:02x}", "INTERFACE_UUID": str(uuid.UUID(int=i + 1))}
            calls.append((f"e{i}", envs(world, root, **nic)))
        agent = AgentProc(ns, calls[0][1][1], root / "agent.log")
        agent.start()

        def wall(script: str, which: int) -> float:
            start = time.perf_counter()
            with ThreadPoolExecutor(parallel) as pool:
                list(pool.map(lambda c: timed(world, script, c[1][which], c[0]), calls))
            return time.perf_counter() - start

        def detach() -> None:
            _batch(ns, [f"link set e{i} nomaster" for i in range(count)])

        out["stock"] = wall(str(stock_ifup), 0)
        detach()
        out["served"] = wall(bin_path("kvm-ifup"), 1)
        assert agent.proc is not None
        out["rss"] = rss_mib(agent.proc.pid)
        out["served ifdown"] = wall(bin_path("kvm-ifdown"), 1)
        out["cold"] = wall(bin_path("kvm-ifup"), 2)
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return out


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=11)
    parser.add_argument("--evacuate", type=int, default=400,
                        help="ifups in the evacuation case (0: skip it)")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--modes", default=",".join(BUILDERS),
                        help=f"comma-separated, among {', '.join(BUILDERS)} (default: all)")
    parser.add_argument("--antispoof", choices=("on", "off"), default="on",
                        help="on: nichooks' default (filters on), the bridged and routed "
                        "others filtered; off: NICHOOKS_ANTISPOOF=off for nichooks, no filters")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(BUILDERS))
    if unknown or not modes:
        parser.error(f"--modes: {', '.join(unknown) or 'none given'}; "
                     f"choose among {', '.join(BUILDERS)}")
    if os.geteuid() != 0:
        print("bench/vs_ganeti.py: needs root (network namespaces, apt-get)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    stock = fetch_stock()
    # On tmpfs, as /run (nichooks' default state directory) is on every systemd host.
    tmp = Path(tempfile.mkdtemp(prefix="nichooks-bench-", dir="/dev/shm"))
    try:
        stock_ifup = runnable_copy(stock, tmp / "stock")
        print(f"Ganeti's stock kvm-ifup from Debian's {stock.version}")
        print(f"{args.pairs} interleaved runs per row (stock ifup; nichooks ifup + ifdown "
              "without an agent; nichooks ifup + ifdown served by the agent), medians in "
              "milliseconds, each a whole process run via `ip netns exec`; ratios are medians "
              "of the per-pair ratio to the stock ifup of the same pair")
        print("nichooks' filtering: " + (
            "on (its default; the bridged and routed others are filtered NICs)"
            if args.antispoof == "on" else
            "off (NICHOOKS_ANTISPOOF=off; the others carry no filters)"))
        heads = ("mode", "others", "stock", "ifup", "ifdown", "ifup+agent", "ifdown+agent",
                 "ifup/stock", "down/stock", "ifup+a/stock", "down+a/stock", "agent RSS MiB")
        print(" | ".join(f"{h:>12}" for h in heads))
        for mode in modes:
            for others in OTHERS:
                r, rss = measure(mode, others, args.pairs, stock_ifup, tmp, args.antispoof)
                ratios = [statistics.median(o / s for o, s in zip(r[k], r["stock"], strict=True))
                          for k in ("ifup", "ifdown", "ifup+a", "ifdown+a")]
                cells = [mode[:12], str(others),
                         *(f"{statistics.median(r[k]) * 1000:.1f}"
                           for k in ("stock", "ifup", "ifdown", "ifup+a", "ifdown+a")),
                         *(f"{x:.2f}" for x in ratios), f"{rss:.0f}"]
                print(" | ".join(f"{c:>12}" for c in cells), flush=True)
        if args.evacuate:
            e = evacuate(stock_ifup, tmp, args.evacuate, args.parallel, args.antispoof)
            print(f"\nevacuation: {args.evacuate} bridged ifups, {args.parallel} at a time, wall "
                  f"seconds: stock {e['stock']:.2f}, nichooks served {e['served']:.2f} "
                  f"({e['served'] / e['stock']:.2f}x), nichooks without an agent "
                  f"{e['cold']:.2f} ({e['cold'] / e['stock']:.2f}x); served ifdowns "
                  f"{e['served ifdown']:.2f}; agent RSS with {args.evacuate} NICs journaled "
                  f"{e['rss']:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
