"""What a Xen vif script can learn about its NIC: the vif name, xenstore, `xl`, and
Ganeti's Xen NIC file (docs/architecture.md, "Interfaces").

libxl gives a vif script nothing but `vif=vif<domid>.<devid>` and the backend's
xenstore path. Ganeti writes the NIC's variables to
`$GANETI_RUN_DIR/xen-hypervisor/nic/<instance>/<devid>` (bash-quoted, TAGS with a
literal `\\ `), keyed by the instance *name*, which only `xl domname` knows; during
`xl migrate-receive` the domain is called `<name>--incoming`. Ganeti does not write
the file on a migration target (#944), so xenstore's mac/ip/bridge are the fallback.

Every external program is run by argv, never through a shell, with a timeout.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from nichooks.errors import InvalidInput, PlumbingError

# ASCII digits, a few of them: `\d` also matches '١' or '²', and int() of a long run of
# digits raises past Python's digit limit. libxl's domids stop at 32767.
VIF_NAME = re.compile(r"vif([0-9]{1,5})\.([0-9]{1,5})")
INCOMING = "--incoming"
TOOL_TIMEOUT = 10.0
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VLAN_SUFFIX = re.compile(r"^(?P<link>.+?)(?P<vlan>(?:\.\d+)?(?::\d+)*)$")


def parse_vif(name: str) -> tuple[int, int]:
    """(domid, devid) from libxl's `vif<domid>.<devid>`."""
    found = VIF_NAME.fullmatch(name)
    if not found:
        raise InvalidInput("vif", f"{name!r} is not a libxl vif name (vif<domid>.<devid>)")
    return int(found.group(1)), int(found.group(2))


def _tool(name: str, env: Mapping[str, str]) -> str:
    """By the caller's PATH first (libxl's hotplug environment), then the usual places."""
    path = ":".join(p for p in (env.get("PATH", ""), SEARCH_PATH) if p)
    found = shutil.which(name, path=path)
    if found is None:
        raise PlumbingError(f"{name} not found (is this a Xen dom0?)", step="xen")
    return found


def _run(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Output decoded as UTF-8 with undecodable bytes kept as surrogates (as Python
    does for argv and the environment): xenstore and `xl domname` hold whatever a
    guest's toolstack put there, and a strict decode would raise before any check
    could refuse the value by name."""
    try:
        return subprocess.run(argv, capture_output=True, encoding="utf-8",
                              errors="surrogateescape", timeout=TOOL_TIMEOUT,
                              check=False, env=dict(env), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PlumbingError(f"{argv[0]} did not answer within {TOOL_TIMEOUT:g}s", step="xen") from None
    except OSError as exc:  # found on PATH but not runnable (mode, format, a directory)
        raise PlumbingError(f"cannot run {argv[0]}: {exc.strerror or exc}", step="xen") from None


class XenStore:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def read(self, key: str) -> str | None:
        """The value, or None when the key does not exist."""
        done = _run([_tool("xenstore-read", self.env), key], self.env)
        return done.stdout.rstrip("\n") if done.returncode == 0 else None

    def write(self, *pairs: tuple[str, str]) -> None:
        argv = [_tool("xenstore-write", self.env)]
        for key, value in pairs:
            argv += [key, value]
        done = _run(argv, self.env)
        if done.returncode != 0:
            stderr = " ".join(done.stderr.split())[:200]  # the error must stay one line
            raise PlumbingError(f"xenstore-write failed: {stderr or 'no message'}", step="xen")


def domain_name(domid: int, env: Mapping[str, str]) -> tuple[str, bool]:
    """(instance name, whether this is an incoming migration) from `xl domname`.

    The name is checked before it is used: it becomes a path component of the NIC
    file (`..` or a `/` would read a file elsewhere) and the INSTANCE of the NIC."""
    from nichooks.model import validate

    done = _run([_tool("xl", env), "domname", str(domid)], env)
    name = done.stdout.strip()
    if done.returncode != 0 or not name:
        stderr = " ".join(done.stderr.split())[:200]
        raise PlumbingError(f"xl domname {domid} failed: {stderr or 'no name'}", step="xen")
    incoming = name.endswith(INCOMING)
    if incoming:
        name = name[: -len(INCOMING)]
    return validate.instance(f"INSTANCE (xl domname {domid})", name), incoming


def nic_file(run_dir: Path, instance: str, devid: int) -> Path:
    return run_dir / "xen-hypervisor" / "nic" / instance / str(devid)


def read_nic_file(path: Path) -> dict[str, str] | None:
    """Ganeti's variables for the NIC, parsed as bash would source them; None if absent.
    Only a regular file is read (shellvars.read_assignments: a FIFO cannot hang us)."""
    from nichooks.callers.shellvars import read_assignments

    return read_assignments(path)


def _is_linux_bridge(name: str) -> bool:
    """Whether `name` is a Linux bridge here; False for anything that is not a
    device name (xenstore is input too: no path outside /sys/class/net is looked at)."""
    from nichooks.model import validate

    try:
        validate.ifname("bridge", name)
        return Path("/sys/class/net", name, "bridge").is_dir()
    except (InvalidInput, OSError):
        return False


def from_xenstore(store: XenStore, backend: str) -> dict[str, str]:
    """What libxl keeps for the vif, as Ganeti variables: mac, ip, and `bridge`, which is
    LINK with the VLAN appended for Open vSwitch (`br0.100`, `br0:10:20`). No bridge and
    an ip means routed (in the main table: the NIC file's LINK is not in xenstore)."""
    mac = store.read(f"{backend}/mac")
    if not mac:
        raise PlumbingError(f"no NIC file and no {backend}/mac in xenstore: nothing describes "
                            "this NIC", step="xen")
    out = {"MAC": mac}
    ip = store.read(f"{backend}/ip")
    words = ip.split() if ip else []  # libxl keeps a space-separated list; blank is none
    if words:
        out["IP"] = words[0]
    bridge = store.read(f"{backend}/bridge")
    if bridge:
        found = VLAN_SUFFIX.match(bridge)
        link, vlan = (found.group("link"), found.group("vlan")) if found else (bridge, "")
        if _is_linux_bridge(bridge):
            link, vlan = bridge, ""
        linux_bridge = _is_linux_bridge(link)
        out["MODE"] = "bridged" if linux_bridge and not vlan else "openvswitch"
        out["LINK"], out["VLAN"] = link, vlan
    elif words:
        out["MODE"] = "routed"
    else:
        raise PlumbingError(f"no NIC file, and xenstore {backend} has neither bridge nor ip",
                            step="xen")
    return out
