"""`nichooks try`: the whole bridged cycle in throwaway network namespaces.

A "host" namespace holds a bridge and the host end of a veth pair, which plays the
guest's tap; the other end sits in a "guest" namespace and plays the guest. The
demo shows the plan, runs the real kvm-ifup and kvm-ifdown entry points, pings
across the bridge, and proves the host namespace is back to what it was. Both
namespaces go away at the end, also on Ctrl-C or SIGTERM; the machine's own
namespace is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

BRIDGE, TAP, GUEST_IF = "br-demo", "tapdemo0", "eth0"
HOST_ADDR, GUEST_ADDR = "192.0.2.1/24", "192.0.2.2/24"
GUEST_MAC = "aa:00:00:5e:00:53"


def _say(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _run(argv: list[str], *, env: dict[str, str] | None = None, check: bool = True,
         show: bool = True) -> subprocess.CompletedProcess[str]:
    if show:
        print("$ " + " ".join(argv), flush=True)
    result = subprocess.run(argv, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    out = (result.stdout + result.stderr).rstrip()
    if show and out:
        print(out, flush=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with status {result.returncode}: {out}")
    return result


def _snapshot(ns: str) -> list[Any]:
    links = json.loads(_run(["ip", "-j", "-n", ns, "-d", "link", "show"], show=False).stdout)
    addrs = json.loads(_run(["ip", "-j", "-n", ns, "addr", "show"], show=False).stdout)
    return [
        sorted((link["ifname"], link.get("address"), link.get("mtu"), link.get("master"),
                "UP" in link.get("flags", [])) for link in links),
        # IPv6 link-local addresses follow carrier (the kernel adds one to the bridge
        # when its first port runs): not ours to compare.
        sorted((a["ifname"], i["local"], i["prefixlen"]) for a in addrs
               for i in a.get("addr_info", []) if i.get("scope") != "link"),
    ]


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: install nichooks with pip first")
    return str(path)


def run_demo(keep_going: bool = True) -> int:
    if os.geteuid() != 0:
        print("nichooks try: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    if shutil.which("ip") is None:
        print("nichooks try: needs iproute2's `ip`", file=sys.stderr)
        return 2
    tag = f"{os.getpid()}"
    host, guest = f"nichooks-try-{tag}", f"nichooks-try-{tag}-guest"
    state = tempfile.mkdtemp(prefix="nichooks-try-")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, interrupted)
    try:
        return _demo(host, guest, state)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"nichooks try: {exc}", file=sys.stderr)
        return 1
    finally:
        for ns in (guest, host):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"\n(cleaned up: namespaces {host}, {guest} and {state} removed)")


def _demo(host: str, guest: str, state: str) -> int:
    _say("1. a throwaway host with a bridge, and a guest joined to it by a veth pair")
    for ns in (host, guest):
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"], show=False)
    # A fixed MAC, as a bridge with an uplink has (one without follows its ports').
    _run(["ip", "-n", host, "link", "add", BRIDGE, "address", "02:00:00:00:00:01",
          "type", "bridge"])
    _run(["ip", "-n", host, "addr", "add", HOST_ADDR, "dev", BRIDGE])
    _run(["ip", "-n", host, "link", "set", BRIDGE, "up"])
    _run(["ip", "-n", host, "link", "add", TAP, "type", "veth", "peer", "name", GUEST_IF,
          "netns", guest])
    _run(["ip", "-n", guest, "link", "set", GUEST_IF, "address", GUEST_MAC])
    _run(["ip", "-n", guest, "addr", "add", GUEST_ADDR, "dev", GUEST_IF])
    _run(["ip", "-n", guest, "link", "set", GUEST_IF, "up"])
    before = _snapshot(host)

    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
        "NICHOOKS_STATE_DIR": state, "NICHOOKS_CONF_DIR": os.path.join(state, "conf"),
        "INSTANCE": "demo.example.org", "MAC": GUEST_MAC, "MODE": "bridged",
        "LINK": BRIDGE, "VLAN": "", "INTERFACE": TAP, "INTERFACE_INDEX": "0",
        "INTERFACE_UUID": str(uuid.uuid4()), "TAGS": "demo",
    }
    inside = ["ip", "netns", "exec", host]
    print("\nthe environment Ganeti would pass:",
          " ".join(f"{k}={v}" for k, v in env.items() if k not in ("PATH", "LC_ALL")))

    _say("2. the plan (nichooks plan: nothing is changed)")
    _run([*inside, _tool("nichooks"), "plan", TAP], env=env)

    _say("3. kvm-ifup, as Ganeti runs it")
    _run([*inside, _tool("kvm-ifup"), TAP], env=env)
    _run(["ip", "-n", host, "-br", "link", "show", "master", BRIDGE])
    _run(["ip", "-n", host, "link", "show", TAP])
    _run([*inside, _tool("nichooks"), "status"], env=env)

    _say("4. the guest pings the host across the bridge")
    _run(["ip", "netns", "exec", guest, "ping", "-c", "3", "-i", "0.2", "-W", "2",
          HOST_ADDR.split("/")[0]])

    _say("5. kvm-ifdown, as QEMU's downscript runs it")
    _run([*inside, _tool("kvm-ifdown"), TAP, "shutdown"], env=env)
    after = _snapshot(host)
    left = sorted(os.listdir(os.path.join(state, "nics")))

    _say("6. is the host namespace back to what it was?")
    if after == before and not left:
        print("yes: links, masters, MTUs, MACs, up/down and addresses are as before "
              "(IPv6 link-local ones aside: the kernel adds those with carrier), "
              "and no journal is left")
        return 0
    print(f"NO: before={before}\n    after={after}\n    journals left={left}")
    return 1
