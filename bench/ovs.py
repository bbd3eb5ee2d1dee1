"""Open vSwitch ifup/ifdown timings, side by side with the same plug done by ovs-vsctl.

Not a test: it prints figures. A private ovsdb-server + ovs-vswitchd (userspace
datapath) runs in a throwaway namespace, the same harness the tests use, with 0,
100 and 1000 other ports on the bridge (internal ports, made in one ovs-vsctl call).
Two latencies matter for a plug: "committed" (ovsdb-server has the port) and
"applied" (ovs-vswitchd has reconfigured: cur_cfg caught up, the port forwards).

- nichooks: the whole kvm-ifup process, and inside it the committed / applied
  times of its one transaction (from its own log line, NICHOOKS_DEBUG=1);
- ovs-vsctl: one `--if-exists del-port -- add-port ... tag -- set interface ...`
  call, with `--no-wait` (returns at commit) and without (waits for ovs-vswitchd).

Run as root:  .venv/bin/python bench/ovs.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crowd import ovs_ports

from tests.integration.ovs_env import Switch
from tests.support.hooks import bin_path
from tests.support.netns import Netns

UUID = "6b1a2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
MAC = "52:54:00:00:00:09"


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done.stderr


def vsctl_plug(sw: Switch, wait: bool) -> list[str]:
    return ["ovs-vsctl", f"--db={sw.db}", *([] if wait else ["--no-wait"]),
            "--", "--if-exists", "del-port", "tapb", "--", "add-port", "br0", "tapb", "tag=100",
            "--", "set", "interface", "tapb", f"external_ids:iface-id={UUID}",
            f"external_ids:attached-mac=\"{MAC}\"", "external_ids:vm-id=bench",
            "external_ids:iface-status=active", "mtu_request=1500"]


def measure(others: int, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in (
        "ifup", "committed", "applied", "ifdown", "vsctl nowait", "vsctl wait", "vsctl del")}
    host = Netns()
    root = Path(tempfile.mkdtemp(prefix="nichooks-bench-"))
    sw = Switch(host, root)
    try:
        sw.start()
        sw.add_bridge("br0")
        if others:
            sw.vsctl("--timeout=300", *ovs_ports(others))
        host.ip("link", "add", "tapb", "type", "veth", "peer", "name", "gb")
        (root / "state").mkdir()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NICHOOKS_STATE_DIR": str(root / "state"),
               "NICHOOKS_CONF_DIR": str(root / "conf"), "NICHOOKS_OVSDB": sw.db,
               "OVS_RUNDIR": str(sw.dir), "NICHOOKS_DEBUG": "1", "MODE": "openvswitch",
               "LINK": "br0", "VLAN": ".100", "IP": "203.0.113.9", "MAC": MAC,
               "INTERFACE": "tapb", "INSTANCE": "bench", "INTERFACE_UUID": UUID}
        inside = ["ip", "netns", "exec", host.name]
        for _ in range(runs):
            seconds, log = timed([*inside, bin_path("kvm-ifup"), "tapb"], env)
            out["ifup"].append(seconds)
            found = re.search(r"committed_ms=([\d.]+) applied_ms=([\d.]+)", log)
            assert found, log
            out["committed"].append(float(found.group(1)) / 1000)
            out["applied"].append(float(found.group(2)) / 1000)
            out["ifdown"].append(timed([*inside, bin_path("kvm-ifdown"), "tapb"], env)[0])
            out["vsctl nowait"].append(timed(vsctl_plug(sw, wait=False), sw.env())[0])
            out["vsctl wait"].append(timed(vsctl_plug(sw, wait=True), sw.env())[0])
            out["vsctl del"].append(timed(["ovs-vsctl", f"--db={sw.db}", "del-port", "tapb"],
                                          sw.env())[0])
    finally:
        sw.stop()
        host.delete()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/ovs.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    print(f"openvswitch mode, {args.runs} runs each, milliseconds (min / median)")
    heads = ("other ports", "nichooks ifup", "its commit", "its applied", "vsctl --no-wait",
             "vsctl (waits)", "nichooks ifdown", "vsctl del-port")
    print(" | ".join(f"{h:>15}" for h in heads))
    for others in (0, 100, 1000):
        r = measure(others, args.runs)

        def cell(key: str, r: dict[str, list[float]] = r) -> str:
            return f"{min(r[key]) * 1000:6.1f} / {statistics.median(r[key]) * 1000:6.1f}"

        keys = ("ifup", "committed", "applied", "vsctl nowait", "vsctl wait", "ifdown", "vsctl del")
        print(" | ".join([f"{others:>15}", *(f"{cell(k):>15}" for k in keys)]), flush=True)
    print("(nichooks ifup also sets the tap's MAC, MTU and up state and adds ~20 anti-spoofing "
          "flows in one OpenFlow bundle; the ovs-vsctl columns plug the port only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
