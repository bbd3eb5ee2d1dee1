"""How fast the agent undoes routed NICs whose taps vanish without an ifdown, side by
side with the same undo run as an explicit `kvm-ifdown` (what Ganeti >= 3.1 calls).

Not a test: it prints figures. Everything happens in a throwaway network namespace
with the agent running inside it. "one" deletes one plugged tap and times until its
journal is gone (rules, host route and uplink proxy entry removed before that);
"burst" deletes N plugged taps in one `ip -batch` and times until every journal is
gone. Run as root:

    .venv/bin/python bench/agent.py [--runs N] [--burst N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
NS = f"nichooks-bench-{os.getpid()}"


def sh(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def inside(*argv: str) -> list[str]:
    return ["ip", "netns", "exec", NS, *argv]


def env_for(state: Path, tap: str = "", index: int = 0) -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NICHOOKS_STATE_DIR": str(state),
           "NICHOOKS_CONF_DIR": str(state / "conf"), "NICHOOKS_IPROUTE2_DIR": str(state / "ip2")}
    if tap:
        env.update({"MODE": "routed", "LINK": "100", "INTERFACE": tap,
                    "MAC": f"aa:00:00:00:{index // 250:02x}:{index % 250:02x}",
                    "IP": f"198.51.{100 + index // 250}.{index % 250 + 10}",
                    "INSTANCE": f"vm{index}.example.org", "INTERFACE_UUID": str(uuid.uuid4())})
    return env


def plug(state: Path, index: int) -> str:
    tap = f"tap{index}"
    sh("ip", "-n", NS, "link", "add", tap, "type", "veth", "peer", "name", f"g{index}")
    subprocess.run(inside(str(BIN / "kvm-ifup"), tap), env=env_for(state, tap, index), check=True,
                   capture_output=True)
    return tap


def journals(state: Path) -> int:
    return len(list((state / "nics").glob("*.json")))


def wait_empty(state: Path, limit: float = 30) -> float:
    start = time.perf_counter()
    while journals(state):
        if time.perf_counter() - start > limit:
            raise SystemExit(f"journals still there after {limit}s")
        time.sleep(0.002)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nichooks-bench-"))
    state = tmp / "state"
    for d in (state / "conf", state / "ip2"):
        d.mkdir(parents=True)
    sh("ip", "netns", "add", NS)
    agent = None
    try:
        sh("ip", "-n", NS, "-batch", "-", stdin="link set lo up\nlink add up0 type veth peer name up1\n"
           "link set up0 up\nlink set up1 up\naddr add 198.51.100.2/24 dev up0\n"
           "route add default via 198.51.100.1 table 100\n")
        sh(*inside("sysctl", "-qw", "net.ipv4.ip_forward=1"))
        # The explicit ifdown, for comparison (no agent running yet).
        explicit = []
        for _ in range(args.runs):
            tap = plug(state, 0)
            start = time.perf_counter()
            subprocess.run(inside(str(BIN / "kvm-ifdown"), tap), env=env_for(state), check=True,
                           capture_output=True)
            explicit.append(time.perf_counter() - start)
            sh("ip", "-n", NS, "link", "del", tap)
        log = (tmp / "agent.log").open("wb")
        prof = ["-m", "cProfile", "-o", os.environ["PROFILE"]] if os.environ.get("PROFILE") else []
        agent = subprocess.Popen(inside(sys.executable, *prof, "-m", "nichooks.cli", "agent", "--foreground"),
                                 env=env_for(state), stdout=log, stderr=log)
        while b"result=started" not in (tmp / "agent.log").read_bytes():
            time.sleep(0.05)
        one = []
        for _ in range(args.runs):
            tap = plug(state, 0)
            sh("ip", "-n", NS, "link", "del", tap)
            one.append(wait_empty(state))
        taps = [plug(state, i) for i in range(args.burst)]
        assert journals(state) == args.burst, journals(state)
        sh("ip", "-n", NS, "-batch", "-", stdin="".join(f"link del {t}\n" for t in taps))
        burst = wait_empty(state, limit=120)
        ms = 1000
        print(f"{'case':<44} {'min ms':>8} {'median ms':>10}")
        print(f"{'explicit kvm-ifdown (one NIC, the baseline)':<44} {min(explicit) * ms:>8.0f} "
              f"{statistics.median(explicit) * ms:>10.0f}")
        print(f"{'agent: one tap vanishes -> journal gone':<44} {min(one) * ms:>8.0f} "
              f"{statistics.median(one) * ms:>10.0f}")
        print(f"{f'agent: {args.burst} taps vanish at once -> all gone':<44} {burst * ms:>8.0f} "
              f"{'':>10}   ({burst / args.burst * ms:.1f} ms per NIC)")
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", NS], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
