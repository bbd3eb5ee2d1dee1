"""Hostile input, everywhere a hook reads (issue 6, item 5).

Every environment variable, argument and file a hook reads - Ganeti's variables,
every NICHOOKS_* setting, argv, spec files, the settings file, journals and the tap
index, Ganeti's KVM runtime files, Xen's NIC file, xenstore and `xl` - gets names
with `/`, `..`, blanks, newlines or more than 15 bytes, multicast MACs, scoped IPv6,
undecodable bytes, digits int() chokes on, and shell metacharacters. Whatever the
input, a hook must:

* exit 2 (naming what was wrong) or exit 1 with exactly one `nichooks: ` line on
  stderr, never a traceback, never an exception of ours ("internal error");
* never run a shell, and never run anything that shell syntax in a value could have
  started (marker files that `$(touch ...)`-style payloads would create);
* write nothing outside what the call owns (its state directory; for Xen, the
  backend's hotplug keys), and never hang.

How: most properties call the entry functions in a forked child that first moves
into a throwaway network namespace holding only `lo` (tests/integration/hostile_runner.py), with
a Python audit hook recording every program started and every path written; each
example gets a fresh sandbox directory whose files outside the state directory are
compared before and after. One property runs in a test namespace with a real bridge
and tap, through one warm runner process, and compares the namespace (links,
addresses, rules, routes, proxies, bridge VLANs) before and after each call: exit 2
changes nothing, exit 1 is rolled back, exit 0 is undone exactly by ifdown.

The figures: each property's example count is a constant below (N_*); `TRIED` counts
the hook calls actually made, and the module prints the total at the end.

The bugs these properties found are fixed; the tests at the end pin the worst of
them (a journal naming files outside the state directory, undo writing outside
/proc/sys, journal variables overriding PATH for the ifdown scripts).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration.hostile_runner import Outcome, preload, run_case
from tests.nstools import Netns, require_root

# -- budget ---------------------------------------------------------------------------
N_ENV = 200          # hostile values for 1-3 of every variable/setting, ifup/ifdown/plan
N_SPEC = 100         # hostile spec files (plain QEMU)
N_CONF = 60          # hostile settings files
N_NAMES = 100        # bad device names in INTERFACE/LINK/BRIDGE/uplinks/argv
N_MAC = 50           # multicast, broadcast and zero MACs, from env and spec files
N_SCOPED = 50        # scoped IPv6 (and IPv4 with a scope) in IP and NETWORK_*
N_ARGV = 30          # argv[1] is informational when INTERFACE is set (2 calls each)
N_JOURNAL = 100      # corrupt journals and tap index entries, then ifdown/ifup/status
N_GANETI = 40        # hostile Ganeti KVM runtime files, then ifdown by tap
N_XEN = 80          # hostile vif-ganeti argv, env, xenstore, xl domname, NIC files
N_NETNS = 40         # real bridge and tap: hostile calls, namespace compared after each

# No shrinking: a failure is reported with the example as generated, and a failing run
# stays bounded in time (shrinking re-runs hook calls hundreds of times).
COMMON = dict(deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
TRIED: collections.Counter[str] = collections.Counter()
EXITS: collections.Counter[int | None] = collections.Counter()

KEY = "6b1a2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
OTHER_KEY = "0f0e0d0c-0b0a-4908-8706-050403020100"
MAC = "aa:00:00:12:34:56"
TAP = "nhxtap0"        # exists nowhere
BRIDGE = "nhxbr0"      # exists nowhere
STANDINS = Path(__file__).with_name("xen_standins")
# Shell payloads write here; nothing may ever appear in it.
MARKS = Path(tempfile.gettempdir()) / f"nichooks-hostile-marks-{os.getpid()}"
BASH_ENV_SCRIPT = MARKS.with_name(MARKS.name + "-bash-env")


# -- hostile values -------------------------------------------------------------------
def _payloads(mark: Path) -> list[str]:
    return [f"$(touch {mark}/cmdsub)", f"`touch {mark}/backtick`", f"x;touch {mark}/semicolon",
            f"x|touch {mark}/pipe", f"x&&touch {mark}/and", f"x\ntouch {mark}/newline",
            f"'$(touch {mark}/sq)'", f'"$(touch {mark}/dq)"', f"${{IFS}}touch${{IFS}}{mark}/ifs",
            f"x>{mark}/redirect", f"$(touch${{IFS}}{mark}/ifs2)", f"a'; touch {mark}/quote; '",
            f"<(touch {mark}/procsub)", f"x\rtouch {mark}/cr", "$HOME", "~root", "*", "?", "[a-z]",
            "{a,b}", "!!", "\\", "'", '"', "%s%n", "%(x)s", "${PATH}"]


PAYLOADS = _payloads(MARKS)
NAME_TRAPS = ["", ".", "..", "/", "../..", "../../etc", "a/b", "tap0/..", "tap 0", " tap0",
              "tap0 ", "tap\n0", "tap0\n", "\ttap0", "tap:0", "tap0\r", "a" * 16,
              "tap0123456789abc", "é" * 8, "täp0", "tap\udcff", "tap\x7f", "t\x01", "-tap0",
              "gnt.com./x", "gnt.com.0 x", "lo", "vif5.0", "x" * 300]
NUMBER_TRAPS = ["²", "١٢", "٣", "9" * 5000, "0" * 5000 + "1", "-1", "+1", " 1", "1 ", "0x10",
                "1e3", "nan", "inf", "-inf", "1_000", "4294967296", "0", "3601", "65536",
                "1e-300", "", " "]
MAC_TRAPS = ["01:00:5e:00:00:01", "33:33:00:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00",
             "03:00:00:00:00:00", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:ff:00", "aa-bb-cc-dd-ee-ff",
             "aabb.ccdd.eeff", "AA:00:00:12:34:56 ", "aa:00:00:12:34:5g", "aa:00:00:12:34:５６",
             "aa:00:00:12:34:56\n", "aa:bb:cc"]
IP_TRAPS = ["fe80::1%eth0", "fe80::1%25eth0", "2001:db8::1%1", "192.0.2.1%eth0", "::ffff:192.0.2.1",
            "255.255.255.255", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "127.0.0.1", "::1",
            "192.0.2.1/24", "2001:db8::/64", "1.2.3", "1.2.3.4.5", "01.2.3.4", "192.0.2.1 192.0.2.2",
            "192.0.2.1\n", "fe80::1", "١٩٢.0.2.1", "2001:db8::1]"]
NET_TRAPS = ["2001:db8::%eth0/64", "fe80::%eth0/64", "10.0.0.0/33", "10.0.0.0/8%x", "2001:db8::/129",
             "::/0", "0.0.0.0/0", "10.0.0.1", "2001:db8::1/64/64", "1.2.3.4/-1", "2001:db8::/64 ",
             "2001:db8::/٦٤"]
UUID_TRAPS = [KEY.upper(), "{" + KEY + "}", "urn:uuid:" + KEY, KEY.replace("-", ""), KEY + "-emu",
              "../" + KEY, KEY + "/..", KEY[:-1], KEY + "\n", "０" * 32, KEY.replace("a", "g")]
VLAN_TRAPS = [".0", ".4095", ".4096", ":", ".", "..100", ".100:100", "1:2:3:", ":1::2", "١", "9" * 30000,
              ".-1", ".+1", ". 1", ".100 ", ".100\n", ".100:200", ":100:200", "100"]
FLAG_TRAPS = ["yes", "no", "maybe", "YES", "1", "0", "on", "true\n", "oui"]


def _path_traps() -> list[str]:
    """Directory settings; `{root}` is the example's sandbox (never outside it)."""
    return ["relative/dir", "", "/" + "a" * 300, "/a" * 2100, "{root}/x\ny", "{root}/outside/victim",
            "{root}/outside/victim/sub", "{root}/loop", "{root}/state/../outside/st", "{root}/\udcff",
            "{root}/state/nics", "~/x", "$HOME"]


PATH_TRAPS = _path_traps()

printable = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
undecodable = st.sampled_from(["\udc80", "\udcff", "\udcc3"])  # bytes that are not UTF-8
free_text = st.text(st.one_of(printable, undecodable), max_size=24)
GENERIC_TRAPS = PAYLOADS + NAME_TRAPS + NUMBER_TRAPS[:8] + IP_TRAPS[:6] + MAC_TRAPS[:4]
generic = st.one_of(st.sampled_from(GENERIC_TRAPS), free_text,
                    st.builds(lambda a, b: a + b, st.sampled_from(GENERIC_TRAPS), free_text))


def _with_generic(traps: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(traps), st.sampled_from(traps), generic)


CATEGORY: dict[str, list[str]] = {}
for _n in ("INTERFACE", "LINK", "BRIDGE", "NICHOOKS_UPLINK4", "NICHOOKS_UPLINK6"):
    CATEGORY[_n] = NAME_TRAPS
for _n in ("INTERFACE_INDEX", "NICHOOKS_LOCK_TIMEOUT", "NICHOOKS_SCRIPT_TIMEOUT",
           "NICHOOKS_RULE_PRIORITY", "NICHOOKS_ROUTE_PROTO", "NICHOOKS_OVS_TIMEOUT",
           "NICHOOKS_OVS_MTU"):
    CATEGORY[_n] = NUMBER_TRAPS
for _n in ("MAC", "NETWORK_MAC_PREFIX"):
    CATEGORY[_n] = MAC_TRAPS
for _n in ("IP", "NETWORK_GATEWAY", "NETWORK_GATEWAY6"):
    CATEGORY[_n] = IP_TRAPS
for _n in ("NETWORK_SUBNET", "NETWORK_SUBNET6"):
    CATEGORY[_n] = NET_TRAPS
for _n in ("INTERFACE_UUID", "NETWORK_UUID"):
    CATEGORY[_n] = UUID_TRAPS
for _n in ("NICHOOKS_STATE_DIR", "NICHOOKS_CONF_DIR", "GANETI_RUN_DIR", "OVS_RUNDIR",
           "NICHOOKS_IPROUTE2_DIR"):
    CATEGORY[_n] = PATH_TRAPS
for _n in ("NICHOOKS_MANAGE_SYSCTLS", "NICHOOKS_ANNOUNCE", "NICHOOKS_OVS_ANTISPOOF"):
    CATEGORY[_n] = [*FLAG_TRAPS, "mac", "off"]
CATEGORY["VLAN"] = VLAN_TRAPS
CATEGORY["MODE"] = ["bridged", "routed", "openvswitch", "ext", "BRIDGED", "bridged ", "", "none"]
CATEGORY["ACTION"] = ["up", "down", "Down", "", "up\n", "reboot"]
CATEGORY["MIGRATION_PHASE"] = ["pre", "post", "during", "", "pre "]
CATEGORY["NICHOOKS_OVSDB"] = ["tcp:127.0.0.1:1", "tcp:[::1]:99999", "tcp:x", "ssl:127.0.0.1:1",
                              "punix:/tmp/nh-x", "unix:relative", "unix:{root}/nosock", "unix:",
                              "tcp:\udcff:1", "unix:{root}/outside/victim"]
CATEGORY["NICHOOKS_TEST_FAULT"] = ["fail-at:1", "fail-at:0", "fail-at:x", "kill-after:",
                                   "fail-at:99"]

GANETI_NAMES = ("INSTANCE", "MAC", "MODE", "INTERFACE", "INTERFACE_INDEX", "INTERFACE_UUID",
                "INTERFACE_NAME", "TAGS", "IP", "LINK", "VLAN", "BRIDGE", "NETWORK_NAME",
                "NETWORK_UUID", "NETWORK_TAGS", "NETWORK_SUBNET", "NETWORK_GATEWAY",
                "NETWORK_SUBNET6", "NETWORK_GATEWAY6", "NETWORK_MAC_PREFIX", "ACTION",
                "MIGRATION_PHASE")


def _setting_names() -> tuple[str, ...]:
    from nichooks.settings import DEFAULTS

    return tuple(DEFAULTS)


SETTING_NAMES = _setting_names()
ENV_NAMES = GANETI_NAMES + SETTING_NAMES + ("NICHOOKS_TEST_FAULT",)


def value_for(name: str) -> st.SearchStrategy[str]:
    traps = CATEGORY.get(name)
    value = _with_generic(traps) if traps else generic
    if name == "NICHOOKS_DEBUG":  # debug output is many lines by design: keep it off
        value = value.filter(lambda v: v.lower() not in ("1", "yes", "true", "on"))
    if name == "NICHOOKS_TEST_FAULT":  # the SIGKILL knob would kill the child, by design
        value = value.filter(lambda v: not v.startswith("kill-after:"))
    return value


def hostile_env_changes(names: tuple[str, ...] = ENV_NAMES, max_size: int = 3
                        ) -> st.SearchStrategy[dict[str, str]]:
    return st.lists(st.sampled_from(names), min_size=1, max_size=max_size, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({n: value_for(n) for n in chosen}))


hostile_arg = st.one_of(st.sampled_from(NAME_TRAPS + PAYLOADS), free_text).filter(
    lambda a: a not in ("-v", "--verbose", "-h", "--help"))


# -- the sandbox ----------------------------------------------------------------------
def _tree(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[Any, ...]]:
    """Every entry under `root` except the `skip` subtrees: type, mode, content."""
    out: dict[str, tuple[Any, ...]] = {}
    skipped = {os.path.realpath(s) for s in skip}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.realpath(full) in skipped and not os.path.islink(full):
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in [*filenames, *dirnames]:
            full = os.path.join(dirpath, name)
            if os.path.realpath(full) in skipped:
                continue
            info = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISREG(info.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(info.st_mode), digest, info.st_mtime_ns)
            elif stat.S_ISLNK(info.st_mode):
                out[rel] = ("link", os.readlink(full))
            else:
                out[rel] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
    return out


@dataclass
class Box:
    """One example's directories: the hook may write only under `state` (and what a
    case declares it owns); `outside/victim` holds the journal key, so a traversal
    that deletes "a tap index entry naming the key" would show."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def ganeti(self) -> Path:
        return self.root / "ganeti"

    @property
    def xs(self) -> Path:
        return self.root / "xs"

    def env(self, **nic: str | None) -> dict[str, str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
               "NICHOOKS_STATE_DIR": str(self.state), "NICHOOKS_CONF_DIR": str(self.conf),
               "GANETI_RUN_DIR": str(self.ganeti), "OVS_RUNDIR": str(self.root / "ovs"),
               "NICHOOKS_OVSDB": f"unix:{self.root}/ovs/db.sock",
               "NICHOOKS_IPROUTE2_DIR": str(self.root / "iproute2"),
               "BASH_ENV": str(BASH_ENV_SCRIPT)}
        env.update({k: v for k, v in nic.items() if v is not None})
        return {k: v for k, v in env.items() if v is not None}

    def nic_env(self, mode: str = "bridged", **over: str | None) -> dict[str, str]:
        nic: dict[str, str | None] = {
            "INSTANCE": "vm1.example.org", "MAC": MAC, "MODE": mode,
            "LINK": "100" if mode == "routed" else BRIDGE, "VLAN": "", "INTERFACE": TAP,
            "INTERFACE_INDEX": "0", "INTERFACE_UUID": KEY, "TAGS": "web prod",
            "IP": "192.0.2.10"}
        nic.update(over)
        return self.env(**nic)

    def fill(self, value: str) -> str:
        return value.replace("{root}", str(self.root))

    def write(self, rel: str, data: bytes | str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
        return path


# The namespace the in-process calls run in: made for this module, holding only `lo`.
# One for all calls (setns is cheap; a new namespace per call costs ~40 ms under load):
# what a hostile call may leave there (a route on lo) changes no property below.
SCRATCH_NETNS: list[str] = ["new"]


@pytest.fixture(scope="module", autouse=True)
def marks(request: pytest.FixtureRequest) -> Iterator[None]:
    """The marker directory shell payloads aim at, BASH_ENV's tattletale, the warm
    imports every forked child inherits, the scratch namespace, and the figures."""
    require_root()
    MARKS.mkdir(exist_ok=True)
    BASH_ENV_SCRIPT.write_text(f"touch {MARKS}/bash-started\n")
    preload()
    scratch = Netns()
    SCRATCH_NETNS[0] = f"/run/netns/{scratch.name}"
    try:
        yield
    finally:
        scratch.delete()
        SCRATCH_NETNS[0] = "new"
    shutil.rmtree(MARKS, ignore_errors=True)
    BASH_ENV_SCRIPT.unlink(missing_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and TRIED:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
        exits = ", ".join(f"exit {k}: {v}" for k, v in sorted(EXITS.items(), key=str))
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nhostile inputs tried: {sum(TRIED.values())} hook calls "
                                f"({detail}); {exits}")


@pytest.fixture(scope="module")
def base_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nh-hostile-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Sandbox:
    """A context manager: a fresh Box, and the checks that hold for every call."""

    def __init__(self, base: Path) -> None:
        self.box = Box(Path(tempfile.mkdtemp(dir=base)))
        for d in ("state", "conf", "ganeti", "outside", "cwd", "xs"):
            (self.box.root / d).mkdir()
        (self.box.root / "outside" / "victim").write_text(KEY)
        (self.box.root / "state" / "taps").mkdir()
        os.symlink("loop", self.box.root / "loop")
        self.owned: list[Path] = []
        self.before: dict[str, tuple[Any, ...]] = {}

    def __enter__(self) -> Box:
        return self.box

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.box.root, ignore_errors=True)

    def seal(self, env: Mapping[str, str], *owned: Path) -> None:
        """Everything is in place: remember the tree outside what the call owns."""
        self.owned = [self.state_dir(env), *owned]
        self.before = _tree(self.box.root, tuple(self.owned))

    def state_dir(self, env: Mapping[str, str]) -> Path:
        value = env.get("NICHOOKS_STATE_DIR") or str(self.box.state)
        return Path(os.path.realpath(value)) if value.startswith("/") else self.box.state

    def call(self, entry: str, argv: list[str], env: Mapping[str, str], *,
             timeout: float = 10.0) -> Outcome:
        TRIED[entry] += 1
        outcome = run_case(entry, argv, env, cwd=str(self.box.root / "cwd"), netns=SCRATCH_NETNS[0],
                           timeout=timeout)
        EXITS[outcome.rc] += 1
        self.check(outcome, env)
        return outcome

    def check(self, outcome: Outcome, env: Mapping[str, str]) -> None:
        """What must hold whatever the input and whatever the exit status."""
        where = f"\nstderr: {outcome.stderr!r}\nrc: {outcome.rc}"
        allowed = [str(p) for p in self.owned] + ["/proc/sys/net", os.devnull]
        problems = outcome.problems(allowed)
        assert not problems, "\n".join(problems) + where
        assert outcome.rc in (0, 1, 2), f"exit status {outcome.rc}" + where
        assert not os.listdir(MARKS), f"a shell ran a payload: {os.listdir(MARKS)}" + where
        after = _tree(self.box.root, tuple(self.owned))
        changed = sorted(k for k in set(self.before) | set(after)
                         if self.before.get(k) != after.get(k))
        assert not changed, f"changed outside what the call owns: {changed}" + where
        assert not os.listdir(self.box.root / "cwd"), "wrote into its working directory" + where
        lines = outcome.error_lines()
        if outcome.rc in (1, 2):
            assert len(lines) == 1, f"expected one line on stderr, got {lines!r}" + where
            assert lines[0].startswith("nichooks: "), lines[0]
        elif outcome.rc == 0:
            assert all(ln.startswith("nichooks: warning: ") for ln in lines), lines


SUBJECT = re.compile(r"nichooks: ([^:]+):")
ARG_SUBJECTS = {"argument TAP", "argument CONTEXT", "TAP", "usage", "command", "type_if", "vif"}


def subject(line: str) -> str:
    found = SUBJECT.match(line)
    assert found, f"an invalid-input line names no variable: {line!r}"
    return found.group(1)


def journals(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "nics").glob("*")) if (state / "nics").is_dir() else []


def tap_index(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "taps").glob("*")) if (state / "taps").is_dir() else []


# -- 1. every variable and setting ------------------------------------------------------
@settings(max_examples=N_ENV, **COMMON)
@given(mode=st.sampled_from(["bridged", "openvswitch", "routed"]),
       changes=hostile_env_changes(),
       argv=st.lists(hostile_arg, max_size=2),
       entry=st.sampled_from(["ifup", "ifup", "ifdown", "plan"]))
def test_hostile_environment(base_dir: Path, mode: str, changes: dict[str, str],
                             argv: list[str], entry: str) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        changes = {k: box.fill(v) for k, v in changes.items()}
        env = box.nic_env(mode, **changes)
        sandbox.seal(env)
        if entry == "plan":  # "--": an operator's argparse options are not hostile input
            outcome = sandbox.call("cli", ["plan", "--", *argv[:1]], env)
        else:
            outcome = sandbox.call(entry, [f"kvm-{entry}", *argv], env)
        tap = env.get("INTERFACE") or (argv[0] if argv else "")
        if outcome.rc == 0:
            # Plumbing needs devices, and the child's namespace has only `lo`.
            assert entry == "ifdown" or env.get("MODE") == "ext" or tap in ("lo", "") \
                or env.get("ACTION") == "down" or tap.startswith("gnt.com."), \
                f"exit 0 for {changes!r}: {outcome.stderr!r}"
        if outcome.rc == 2:
            named = subject(outcome.error_lines()[0])
            dependents = {"LINK", "IP", "VLAN", "INTERFACE"} if "MODE" in changes else set()
            assert named in set(changes) | ARG_SUBJECTS | dependents | {"INTERFACE"} \
                or named.startswith("/"), f"{named!r} for {changes!r}"
        if outcome.rc != 0 and entry != "ifdown":
            assert journals(sandbox.state_dir(env)) == [], "a refused ifup left a journal"


# -- 2. spec files (plain QEMU) ------------------------------------------------------------
SPEC_BASE = ["INSTANCE=vm1.example.org", f"MAC={MAC}", "MODE=bridged", f"LINK={BRIDGE}"]


def _quote(value: str, style: str) -> str:
    if style == "single":
        return "'" + value.replace("'", "'\\''") + "'"
    if style == "double":
        return '"' + "".join("\\" + c if c in '$`"\\' else c for c in value) + '"'
    if style == "ansi":
        return "$'" + value + "'"
    return value  # raw: whatever bash would make of it


spec_line = st.one_of(
    st.builds(lambda n, v, q: f"{n}={_quote(v, q)}", st.sampled_from((*GANETI_NAMES, "NICHOOKS_STATE_DIR")),
              generic, st.sampled_from(["raw", "single", "double", "ansi"])),
    st.sampled_from([*PAYLOADS, "export", "export MAC", "MAC+=x", "A[1]=x", "''MAC=x", "#", "\\",
                     "MAC=~", "export A=x{1,2}", "source /etc/passwd", ". /etc/passwd"]),
    free_text)


@st.composite
def spec_files(draw: st.DrawFn) -> bytes:
    lines = list(SPEC_BASE)
    for extra in draw(st.lists(spec_line, max_size=5)):
        lines.insert(draw(st.integers(0, len(lines))), extra)
    data = "\n".join(lines).encode("utf-8", "surrogateescape") + b"\n"
    damage = draw(st.sampled_from(["none", "none", "truncate", "crlf", "bytes", "nul"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif damage == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif damage == "nul":
        data += b"MODE=\x00bridged\n"
    return data


@settings(max_examples=N_SPEC, **COMMON)
@given(spec=spec_files(), entry=st.sampled_from(["ifup", "ifup", "plan"]))
def test_hostile_spec_file(base_dir: Path, spec: bytes, entry: str) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        path = box.write(f"state/specs/{TAP}", spec)
        env = box.env()
        sandbox.seal(env)
        argv = ["plan", TAP] if entry == "plan" else ["kvm-ifup", TAP]
        outcome = sandbox.call("cli" if entry == "plan" else "ifup", argv, env)
        if outcome.rc == 0:
            assert b"ext" in spec, f"exit 0 for a NIC on devices that do not exist: {spec!r}"
        if outcome.rc == 2:
            named = subject(outcome.error_lines()[0])
            assert named.startswith(str(path)) or named in GANETI_NAMES, named
        assert journals(box.state) == [] or outcome.rc == 0


# -- 3. the settings file ----------------------------------------------------------------------
conf_line = st.one_of(
    st.sampled_from(["[nichooks]", "[NICHOOKS]", "[other]", "[nichooks", "= x", "  continued",
                     "%(x)s", "key", "[nichooks]\n[nichooks]"]),
    st.builds(lambda n, sep, v: f"{n}{sep}{v}",
              st.sampled_from(SETTING_NAMES).map(lambda n: n if n != "NICHOOKS_DEBUG" else "NICHOOKS_X"),
              st.sampled_from(["=", " = ", ":", " "]),
              st.one_of(*[st.sampled_from(t) for t in (NUMBER_TRAPS, PATH_TRAPS, NAME_TRAPS, FLAG_TRAPS)],
                        generic)),
    free_text)


@settings(max_examples=N_CONF, **COMMON)
@given(lines=st.lists(conf_line, min_size=1, max_size=6), header=st.booleans(),
       junk=st.sampled_from([b"", b"", b"\xff\xfe", b"\x00", b"\r\n"]))
def test_hostile_settings_file(base_dir: Path, lines: list[str], header: bool, junk: bytes) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        text = "\n".join((["[nichooks]"] if header else []) + [box.fill(ln) for ln in lines])
        conf = box.write("conf/nichooks.conf", text.encode("utf-8", "surrogateescape") + junk)
        env = box.nic_env()
        for name in SETTING_NAMES:  # the file only counts where the environment is silent
            if name not in ("NICHOOKS_CONF_DIR",):
                env.pop(name, None)
        env["NICHOOKS_STATE_DIR"] = str(box.state)  # ... but this one must stay in the box
        sandbox.seal(env)
        outcome = sandbox.call("ifup", ["kvm-ifup"], env)
        assert outcome.rc in (1, 2)
        if outcome.rc == 2:
            named = subject(outcome.error_lines()[0])
            assert named in SETTING_NAMES or named.startswith(str(conf)), named


# -- 4. bad device names ------------------------------------------------------------------------
bad_name = st.one_of(
    st.sampled_from([n for n in NAME_TRAPS if n and n not in ("-tap0", "lo", "vif5.0")]),
    st.builds(lambda a, bad, b: a + bad + b, st.text("abcxyz019-_.", max_size=6),
              st.sampled_from(["/", " ", "\n", "\t", ":", "\r", "\x0b", "\udcff", "é", "/../"]),
              st.text("abcxyz019-_.", max_size=6)),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=16, max_size=40),
    st.text("éü€ñ", min_size=8, max_size=15),  # at most 15 characters, but 16+ bytes
).filter(bool)  # empty means unset, which is not a bad name


@settings(max_examples=N_NAMES, **COMMON)
@given(where=st.sampled_from(["INTERFACE", "LINK", "BRIDGE", "argument TAP", "NICHOOKS_UPLINK4",
                              "NICHOOKS_UPLINK6"]),
       name=bad_name, entry=st.sampled_from(["ifup", "ifdown", "plan"]))
def test_bad_names_are_invalid_input(base_dir: Path, where: str, name: str, entry: str) -> None:
    if entry == "ifdown" and where in ("LINK", "BRIDGE"):
        entry = "ifup"  # ifdown reads neither
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        over: dict[str, str | None] = {}
        argv: list[str] = []
        if where == "argument TAP":
            over["INTERFACE"] = None
            argv = [name]
        elif where == "BRIDGE":
            over.update(LINK=None, BRIDGE=name)
        else:
            over[where] = name
        env = box.nic_env("bridged", **over)
        sandbox.seal(env)
        if entry == "plan":
            outcome = sandbox.call("cli", ["plan", "--", *argv], env)
        else:
            outcome = sandbox.call(entry, [f"kvm-{entry}", *argv], env)
        assert outcome.rc == 2, f"{where}={name!r}: {outcome.stderr!r}"
        assert outcome.error_lines()[0].startswith(f"nichooks: {where}: "), outcome.stderr


# -- 5. multicast, broadcast and zero MACs ------------------------------------------------------
@st.composite
def bad_macs(draw: st.DrawFn) -> str:
    octets = draw(st.lists(st.integers(0, 255), min_size=6, max_size=6))
    kind = draw(st.sampled_from(["multicast", "broadcast", "zero", "ipv4mcast", "ipv6mcast"]))
    if kind == "multicast":
        octets[0] |= 1
    elif kind == "broadcast":
        octets = [255] * 6
    elif kind == "zero":
        octets = [0] * 6
    elif kind == "ipv4mcast":
        octets[:3] = [0x01, 0x00, 0x5E]
    else:
        octets[:2] = [0x33, 0x33]
    text = ":".join(f"{o:02x}" for o in octets)
    return text.upper() if draw(st.booleans()) else text


@settings(max_examples=N_MAC, **COMMON)
@given(mac=bad_macs(), source=st.sampled_from(["env", "spec"]), mode=st.sampled_from(
    ["bridged", "openvswitch", "routed", "ext"]))
def test_group_and_zero_macs_are_invalid_input(base_dir: Path, mac: str, source: str, mode: str) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        if source == "env":
            env = box.nic_env(mode, MAC=mac)
            argv = ["kvm-ifup"]
        else:
            lines = [ln for ln in SPEC_BASE if not ln.startswith(("MAC=", "MODE="))]
            box.write(f"state/specs/{TAP}", "\n".join([*lines, f"MODE={mode}", "IP=192.0.2.10",
                                                        f"MAC='{mac}'"]) + "\n")
            env = box.env()
            argv = ["kvm-ifup", TAP]
        sandbox.seal(env)
        outcome = sandbox.call("ifup", argv, env)
        assert outcome.rc == 2, outcome.stderr
        assert outcome.error_lines()[0].startswith("nichooks: MAC: "), outcome.stderr


# -- 6. scoped addresses ----------------------------------------------------------------------
@st.composite
def scoped(draw: st.DrawFn) -> tuple[str, str]:
    var = draw(st.sampled_from(["IP", "NETWORK_GATEWAY6", "NETWORK_SUBNET6", "NETWORK_GATEWAY",
                                "NETWORK_SUBNET"]))
    scope = draw(st.one_of(st.sampled_from(["eth0", "1", "25eth0", "", "lo", "%", "tap0/.."]),
                           st.text("abcdefxyz0123456789.", min_size=1, max_size=15)))
    if var in ("NETWORK_GATEWAY", "NETWORK_SUBNET"):
        addr = draw(st.sampled_from(["192.0.2.1", "10.0.0.1"]))
    elif var == "IP":
        addr = draw(st.sampled_from(["fe80::1", "fe80::a8ff:fe12:3456", "2001:db8::10", "192.0.2.10"]))
    else:
        addr = draw(st.sampled_from(["fe80::1", "2001:db8::1", "2001:db8:1::"]))
    value = f"{addr}%{scope}"
    if var.startswith("NETWORK_SUBNET"):
        value += draw(st.sampled_from(["/64", "/24", "/128", ""]))
    return var, value


@settings(max_examples=N_SCOPED, **COMMON)
@given(case=scoped(), mode=st.sampled_from(["routed", "bridged"]))
def test_scoped_addresses_are_invalid_input(base_dir: Path, case: tuple[str, str], mode: str) -> None:
    var, value = case
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        env = box.nic_env(mode, **{var: value})
        sandbox.seal(env)
        outcome = sandbox.call("ifup", ["kvm-ifup"], env)
        assert outcome.rc == 2, f"{var}={value!r}: {outcome.stderr!r}"
        assert outcome.error_lines()[0].startswith(f"nichooks: {var}: "), outcome.stderr


# -- 7. argv[1] is informational when INTERFACE is set ---------------------------------------------
@settings(max_examples=N_ARGV, **COMMON)
@given(arg=hostile_arg, entry=st.sampled_from(["ifup", "ifdown"]))
def test_argument_is_informational_when_interface_is_set(base_dir: Path, arg: str, entry: str) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        env = box.nic_env()
        sandbox.seal(env)
        extra = ["true"] if entry == "ifdown" else []
        plain = sandbox.call(entry, [f"kvm-{entry}", TAP, *extra], env)
        hostile = sandbox.call(entry, [f"kvm-{entry}", arg, *extra], env)
        assert (hostile.rc, hostile.stderr) == (plain.rc, plain.stderr), arg


# -- 8. corrupt journals and tap index entries --------------------------------------------------
def _journal(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": 1, "key": KEY, "tap": TAP, "mode": "bridged", "instance": "vm1.example.org",
        "link": BRIDGE, "ifindex": 4242, "context": "start", "state": "applied", "created": 1.0,
        "variables": {"MODE": "bridged", "INTERFACE": TAP}, "deferred": [],
        "records": [{"kind": "link.attr", "undo": {"ifindex": 4242, "attr": "master", "old": None,
                                                   "new": 7}, "step": "master", "status": "pending"}]}
    data.update(over)
    return data


LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on
KINDS = ["link.attr", "bridge.vlans", "sysctl.dev", "sysctl.shared", "rule", "route.host",
         "route.proxy", "ovs.port", "ovs.flows", "nonsense", ""]
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), free_text,
                        st.sampled_from(NAME_TRAPS + PAYLOADS))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["ifindex", "dev", "attr", "old", "new", "addr", "table", "priority", "family", "port",
         "owner", "bridge", "cookie", "added", "removed", "key", "proto", "plen"]), inner, max_size=5)),
    max_leaves=8)
# A `tap` with '/' or '..' is in (it names files: the journal is refused as corrupt), and
# a `step` with a newline (entry.single_line keeps the warnings one line each).
journal_tap = st.one_of(st.sampled_from(NAME_TRAPS), free_text.filter(lambda t: "\x00" not in t),
                        json_scalar.filter(lambda v: not isinstance(v, str)))
record = st.fixed_dictionaries(
    {"kind": st.one_of(st.sampled_from(KINDS), json_scalar), "undo": st.one_of(json_value, st.dictionaries(
        st.sampled_from(["ifindex", "dev", "attr", "old", "new", "addr", "table", "key"]), json_scalar,
        max_size=6))},
    optional={"step": st.one_of(json_scalar, free_text, st.sampled_from(LINE_BREAKS).map(
        lambda c: f"x{c}nichooks: forged")),
        "status": json_scalar, "error": json_scalar})


@st.composite
def journal_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "truncated", "field", "records", "records", "shape"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "truncated":
        data = json.dumps(_journal()).encode()
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "shape":
        return json.dumps(draw(json_value)).encode()
    if kind == "records":
        return json.dumps(_journal(records=draw(st.lists(record, max_size=4)),
                                   tap=draw(st.one_of(st.just(TAP), journal_tap)))).encode()
    field = draw(st.sampled_from(sorted(_journal())))
    value = draw(st.one_of(json_value, journal_tap)) if field != "tap" else draw(journal_tap)
    return json.dumps(_journal(**{field: value})).encode()


tap_entry = st.one_of(st.just(KEY.encode()), st.just(OTHER_KEY.encode()), st.binary(max_size=60),
                      st.sampled_from([b"", b"../../outside/victim", KEY.encode() + b"\n",
                                       (KEY + "/../x").encode(), b"\xff" * 36]))


@settings(max_examples=N_JOURNAL, **COMMON)
@given(journal=journal_bytes(), other=st.one_of(st.none(), journal_bytes()),
       index=st.one_of(st.none(), tap_entry),
       junk=st.lists(st.sampled_from(["nics/not-a-uuid.json", "nics/.json", f"nics/{KEY}.json.tmp",
                                      f"tmp/{KEY}.json.1.tmp", "corrupt/x", f"nics/{KEY.upper()}.json"]),
                     max_size=2),
       call=st.sampled_from(["ifdown-tap", "ifdown-uuid", "ifdown-bare", "ifup-ext", "status",
                             "status-json", "announce"]))
def test_corrupt_journals(base_dir: Path, journal: bytes, other: bytes | None, index: bytes | None,
                          junk: list[str], call: str) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        box.write(f"state/nics/{KEY}.json", journal)
        if other is not None:
            box.write(f"state/nics/{OTHER_KEY}.json", other)
        if index is not None:
            box.write(f"state/taps/{TAP}", index)
        for rel in junk:
            box.write(f"state/{rel}", b"{")
        env = box.nic_env("ext")
        sandbox.seal(env)
        if call == "ifdown-tap":
            env = {k: v for k, v in env.items() if k not in ("INTERFACE", "INTERFACE_UUID")}
            outcome = sandbox.call("ifdown", ["kvm-ifdown", TAP], env)
        elif call == "ifdown-uuid":
            outcome = sandbox.call("ifdown", ["kvm-ifdown", TAP, "hot-unplug"], env)
        elif call == "ifdown-bare":
            env = {k: v for k, v in env.items() if k != "INTERFACE"}
            outcome = sandbox.call("ifdown", ["kvm-ifdown"], env)
        elif call == "ifup-ext":
            outcome = sandbox.call("ifup", ["kvm-ifup"], env)
        elif call == "announce":
            outcome = sandbox.call("cli", ["announce", TAP], env)
        else:
            outcome = sandbox.call("cli", ["status", *(["--json"] if call == "status-json" else [])], env)
            assert outcome.rc == 0 and outcome.stderr == "", outcome.stderr
            if call == "status-json":
                json.loads(outcome.stdout)
        if call.startswith("ifdown"):
            assert outcome.rc in (0, 2), outcome.stderr
        if call == "ifup-ext":
            assert outcome.rc == 0, outcome.stderr


# -- 9. Ganeti's KVM runtime files ----------------------------------------------------------------
def _runtime_nic(uuid: Any = KEY, **over: Any) -> dict[str, Any]:
    nic: dict[str, Any] = {"mac": MAC, "uuid": uuid, "nicparams": {"mode": "bridged", "link": BRIDGE},
                           "ip": None, "name": None, "network": None}
    nic.update(over)
    return nic


runtime_doc = st.one_of(
    st.builds(lambda nics: json.dumps([["kvm"], nics, {}, []]), st.lists(st.one_of(
        st.builds(_runtime_nic, st.one_of(st.just(KEY), st.sampled_from(UUID_TRAPS), json_scalar)),
        st.builds(lambda k, v: _runtime_nic(**{k: v}), st.sampled_from(["mac", "nicparams", "network", "ip",
                                                                         "name", "netinfo"]),
                  json_value)), max_size=3)),
    st.builds(json.dumps, json_value), free_text, st.just("[" * 5000), st.just("1" * 5000))
instance_dir = st.one_of(st.just("vm1.example.org"), st.sampled_from(
    ["...", "a b", "a\nb", "\udcff", "x" * 200, "-x", "$(touch x)"]))


@settings(max_examples=N_GANETI, **COMMON)
@given(instance=instance_dir, files=st.dictionaries(
    st.one_of(st.sampled_from(["0", "1", "00", KEY, "9" * 7, "-1", "x"])),
    st.one_of(st.just(TAP.encode()), st.just(TAP.encode() + b"\n"), st.binary(max_size=20),
              st.sampled_from([b"../x", b"lo", b"nhxtap0\n\n"])), max_size=3),
       runtime=runtime_doc, link_out=st.booleans(), pid=st.sampled_from([None, "1", "999999999", "x" * 70]))
def test_hostile_ganeti_runtime_files(base_dir: Path, instance: str, files: dict[str, bytes],
                                      runtime: str, link_out: bool, pid: str | None) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        kvm = "ganeti/kvm-hypervisor"
        for name, content in files.items():
            box.write(f"{kvm}/nic/{instance}/{name}", content)
        box.write(f"{kvm}/conf/{instance}.runtime", runtime)
        if link_out:  # a symlink out of the run directory, and one to a FIFO
            (box.ganeti / "kvm-hypervisor" / "nic").mkdir(parents=True, exist_ok=True)
            os.symlink(box.root / "outside", box.ganeti / "kvm-hypervisor" / "nic" / "evil")
            os.mkfifo(box.root / "outside" / "fifo")
            os.symlink(box.root / "outside" / "fifo",
                       box.ganeti / "kvm-hypervisor" / "conf" / "evil.runtime")
        if pid is not None:
            box.write(f"{kvm}/pid/{instance}", pid)
        env = {k: v for k, v in box.env().items()}
        sandbox.seal(env)
        outcome = sandbox.call("ifdown", ["kvm-ifdown", TAP], env)
        assert outcome.rc == 0 and outcome.stderr == "", outcome.stderr


# -- 10. Xen: vif-ganeti ------------------------------------------------------------------------------
XEN_NIC_FILE = f"""TAGS="web\\ prod"
MAC={MAC}
IP=192.0.2.5
INTERFACE_INDEX=0
INTERFACE_UUID={KEY}
MODE=bridged
LINK={BRIDGE}
VLAN=
"""
xs_value = st.one_of(st.none(), st.sampled_from(NAME_TRAPS + MAC_TRAPS + IP_TRAPS + PAYLOADS + [
    "br0.100", "br0:10:20", "  ", "nhxbr0", MAC, "192.0.2.5 192.0.2.6", "\n"]), free_text)


XEN_VALID: dict[str, Any] = {
    "command": "online", "type_if": "type_if=vif", "vif": "vif5.0", "backend": "backend/vif/5/0",
    "mac": MAC, "ip": None, "bridge": None, "vifname": None, "domname": "vm1.example.org",
    "nic_file": XEN_NIC_FILE.encode(), "interface": None}
XEN_HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "command": st.one_of(st.sampled_from(["offline", "add", "remove"]), hostile_arg),
    "type_if": st.sampled_from([None, "type_if=tap", "type_if=$(x)", "type_if=", "type_if=vif x"]),
    "vif": st.one_of(st.sampled_from(["vif5", "vif١.٠", "vif" + "9" * 5000 + ".0", "vif5.0/..", "eth0",
                                      "vif5.0 ", "", "vif05.00", "vif99999.99999"]), free_text),
    "backend": st.sampled_from(["", "../../outside", "backend/vif/5/0/..", "-w", "backend//vif",
                                "backend/vif/5/0\n", "/local/domain/0/backend/vif/5/0",
                                "backend/vif/5/0 x", "x" * 600]),
    "mac": xs_value, "ip": xs_value, "bridge": xs_value, "vifname": xs_value,
    "domname": st.one_of(st.sampled_from(
        ["vm1.example.org--incoming", "../outside", "a/b", "", "\n", "--incoming", "x y", "..",
         "$(touch " + str(MARKS) + "/xl)", "vm1\nvm2", "\udcff", "x" * 300]), free_text),
    "nic_file": st.one_of(st.none(), spec_files()),
    "interface": st.sampled_from(NAME_TRAPS),
}


@st.composite
def xen_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A valid `online` call with one to three things hostile."""
    case = dict(XEN_VALID)
    for field in draw(st.lists(st.sampled_from(sorted(XEN_HOSTILE)), min_size=1, max_size=3,
                               unique=True)):
        case[field] = draw(XEN_HOSTILE[field])
    return case


@settings(max_examples=N_XEN, **COMMON)
@given(case=xen_cases())
def test_hostile_xen(base_dir: Path, case: dict[str, Any]) -> None:
    command, type_if, vif, backend = case["command"], case["type_if"], case["vif"], case["backend"]
    domname, nic_file, interface = case["domname"], case["nic_file"], case["interface"]
    xs = {k: case[k] for k in ("mac", "ip", "bridge", "vifname")}
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        safe_backend = "backend/vif/5/0"
        (box.xs / safe_backend).mkdir(parents=True)
        for key, value in xs.items():
            if value is not None:
                box.write(f"xs/{safe_backend}/{key}", value)
        box.write("xs/.xl/domname/5", domname)
        instance = domname.strip().removesuffix("--incoming")
        if nic_file is not None and instance and "/" not in instance and instance not in (".", "..") \
                and len(os.fsencode(instance)) <= 255:
            box.write(f"ganeti/xen-hypervisor/nic/{instance}/0", nic_file)
        env = box.env(vif=vif or None, XENBUS_PATH=backend or None, INTERFACE=interface,
                      XENSTORE_DIR=str(box.xs), PATH=f"{STANDINS}:/usr/sbin:/usr/bin:/sbin:/bin")
        owned = []
        if backend in (safe_backend, "/local/domain/0/backend/vif/5/0"):
            # the call owns its backend's hotplug keys (the stand-in keeps them as files)
            (box.xs / backend.lstrip("/")).mkdir(parents=True, exist_ok=True)
            owned = [box.xs / backend.lstrip("/") / key for key in ("hotplug-status", "hotplug-error")]
        sandbox.seal(env, *owned)
        argv = ["vif-ganeti", command, *([type_if] if type_if else [])]
        outcome = sandbox.call("vif", argv, env)
        tools = {os.path.basename(e[0]) for e in outcome.execs}
        assert tools <= {"xenstore-read", "xenstore-write", "xl"}, outcome.execs
        if outcome.rc == 0:  # vif5.0 exists nowhere: only ext mode (scripts only) plugs it
            assert command in ("offline", "remove") or (type_if or "type_if=vif").endswith(
                "tap" if command in ("online", "offline") else "vif") \
                or b"ext" in (nic_file or b""), outcome.stderr
        if outcome.rc == 2 and backend == safe_backend:
            status = box.xs / safe_backend / "hotplug-status"
            assert not status.exists() or status.read_text() == "error"


# -- 11. a real bridge and tap, the namespace compared after every call ------------------------------
class NetnsRunner:
    """One warm hostile_runner process inside a test namespace with a bridge and a tap."""

    def __init__(self, ns: Netns, root: Path) -> None:
        self.ns = ns
        self.root = root
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-m", "tests.integration.hostile_runner"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd=str(Path(__file__).parents[2]))

    def call(self, entry: str, argv: list[str], env: Mapping[str, str], cwd: Path) -> Outcome:
        TRIED[f"{entry} (netns)"] += 1
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"entry": entry, "argv": argv, "env": dict(env),
                                          "cwd": str(cwd), "timeout": 20}) + "\n")
        self.proc.stdin.flush()
        outcome = Outcome(**json.loads(self.proc.stdout.readline()))
        EXITS[outcome.rc] += 1
        return outcome

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def plumbed() -> Iterator[NetnsRunner]:
    ns = Netns()
    root = Path(tempfile.mkdtemp(prefix="nh-hostile-ns-"))
    try:
        ns.ip("link", "add", "br0", "type", "bridge")
        ns.ip("link", "set", "br0", "mtu", "1400")
        ns.ip("link", "set", "br0", "address", "02:00:00:00:00:01", "up")
        ns.ip("addr", "add", "192.0.2.1/24", "dev", "br0")
        ns.ip("tuntap", "add", "dev", "tap0", "mode", "tap")
        ns.ip("link", "set", "tap0", "address", "aa:00:00:99:88:77")
        ns.ip("link", "add", "br1", "type", "bridge")  # down, another place to plug into
        # A fixed MAC, as a bridge with an uplink has: one without takes its lowest port's
        # and falls back to zeros when that port leaves (the kernel's doing, not a hook's).
        ns.ip("link", "set", "br1", "address", "02:00:00:00:00:02")
        runner = NetnsRunner(ns, root)
        try:
            yield runner
        finally:
            runner.close()
    finally:
        ns.delete()
        shutil.rmtree(root, ignore_errors=True)


NETNS_NAMES = ("INSTANCE", "MAC", "MODE", "INTERFACE", "INTERFACE_INDEX", "INTERFACE_UUID",
               "INTERFACE_NAME", "TAGS", "IP", "LINK", "VLAN", "BRIDGE", "NETWORK_NAME",
               "NETWORK_SUBNET6", "NETWORK_GATEWAY6", "MIGRATION_PHASE", "NICHOOKS_TEST_FAULT",
               "NICHOOKS_OVS_MTU", "NICHOOKS_LOCK_TIMEOUT")


@settings(max_examples=N_NETNS, **COMMON)
@given(kind=st.sampled_from(["env", "env", "fault", "device", "spec", "journal"]),
       changes=hostile_env_changes(NETNS_NAMES, max_size=2),
       soft=hostile_env_changes(("TAGS", "INSTANCE", "INTERFACE_NAME", "NETWORK_NAME",
                                 "MIGRATION_PHASE", "INTERFACE_INDEX", "VLAN"), max_size=1),
       step=st.integers(1, 5), spec=spec_files(), journal=journal_bytes(),
       real=st.tuples(st.sampled_from(["INTERFACE", "LINK"]), st.sampled_from(["tap0", "br0", "br1", "lo"])))
def test_hostile_calls_on_a_real_bridge(plumbed: NetnsRunner, base_dir: Path, kind: str,
                                        changes: dict[str, str], soft: dict[str, str], step: int,
                                        spec: bytes, journal: bytes, real: tuple[str, str]) -> None:
    """Kinds: hostile variables; a failure injected at step `step` (NICHOOKS_TEST_FAULT)
    with one more odd value, so rollback runs on real devices; a device that does exist
    (another bridge, the bridge itself, lo) in INTERFACE or LINK; a hostile spec file;
    a corrupt journal and tap index entry for the NIC being plugged."""
    ns = plumbed.ns
    box = Box(Path(tempfile.mkdtemp(dir=base_dir)))
    try:
        (box.root / "cwd").mkdir()
        before = ns.snapshot()
        base = box.env(INSTANCE="vm1.example.org", MAC="aa:00:00:11:22:33", MODE="bridged", LINK="br0",
                       VLAN="", INTERFACE="tap0", INTERFACE_INDEX="0", INTERFACE_UUID=KEY, TAGS="web")
        if kind == "env":
            changes = {k: box.fill(v) for k, v in changes.items()}
            env = {**base, **changes}
            argv = ["kvm-ifup", "tap0"]
        elif kind == "fault":
            changes = {**soft, "NICHOOKS_TEST_FAULT": f"fail-at:{step}"}
            env = {**base, **changes}
            argv = ["kvm-ifup", "tap0"]
        elif kind == "device":
            changes = dict([real])
            env = {**base, **changes}
            argv = ["kvm-ifup", "tap0"]
        elif kind == "spec":
            box.write("state/specs/tap0", spec.replace(BRIDGE.encode(), b"br0"))
            env = box.env()
            argv = ["kvm-ifup", "tap0"]
        else:
            box.write(f"state/nics/{KEY}.json", journal)
            box.write("state/taps/tap0", KEY)
            env = base
            argv = ["kvm-ifup", "tap0"]
        outcome = plumbed.call("ifup", argv, env, box.root / "cwd")
        where = f"\n{kind} {changes if kind in ('env', 'fault', 'device') else ''}\n" \
                f"stderr: {outcome.stderr!r}"
        state = Path(os.path.realpath(env.get("NICHOOKS_STATE_DIR", str(box.state))))
        problems = outcome.problems([str(state), "/proc/sys/net", os.devnull])
        assert not problems, "\n".join(problems) + where
        assert not os.listdir(MARKS), "a shell ran a payload" + where
        if outcome.rc == 0:
            down = plumbed.call("ifdown", ["kvm-ifdown", env.get("INTERFACE") or "tap0"],
                                {k: v for k, v in box.env().items()}, box.root / "cwd")
            if kind == "journal":
                # Records of the old journal that could not be undone (an unknown kind,
                # garbage arguments) are carried into the new one, by design, and ifdown
                # warns about them again: one `nichooks: warning:` line each.
                assert down.rc == 0, down.stderr + where
                assert all(ln.startswith("nichooks: warning: ") for ln in down.error_lines()), where
            else:
                assert down.rc == 0 and down.stderr == "", down.stderr + where
                assert journals(box.state) == [], journals(box.state)
        else:
            assert outcome.rc in (1, 2), where
            lines = outcome.error_lines()
            assert len(lines) == 1 and lines[0].startswith("nichooks: "), where
            if kind != "journal":
                assert journals(state) == [], "a refused ifup left a journal" + where
        after = ns.snapshot()
        assert after == before, f"the namespace changed (exit {outcome.rc})" + where
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


# -- files of the wrong kind ------------------------------------------------------------------------
def _make(kind: str, path: Path, box: Box) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "loop":
        os.symlink(path.name, path)
    elif kind == "dangling":
        os.symlink(box.root / "nowhere", path)
    elif kind == "outside":
        os.symlink(box.root / "outside" / "victim", path)
    elif kind == "big":
        path.write_bytes(b"A" * (2 << 20))
    elif kind == "empty":
        path.write_bytes(b"")


FILE_KINDS = ["directory", "fifo", "loop", "dangling", "outside", "big", "empty"]
def _wrong_kind_params() -> list[Any]:
    params = []
    for target in ("spec", "conf", "journal", "tap-index", "xen-nic", "rt_tables", "ifup.d",
                   "ifdown.d"):
        for kind in FILE_KINDS:
            params.append(pytest.param(target, kind, id=f"{target}-{kind}"))
    return params


@pytest.mark.parametrize(("target", "kind"), _wrong_kind_params())
def test_files_of_the_wrong_kind(base_dir: Path, target: str, kind: str) -> None:
    """Every file a hook reads, replaced by a directory, a FIFO, a symlink loop, a
    dangling symlink, a symlink out of its directory, 2 MiB of junk or nothing."""
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        env = box.nic_env()
        argv, entry = ["kvm-ifup"], "ifup"
        if target == "spec":
            path = box.state / "specs" / TAP
            env = box.env()
            argv = ["kvm-ifup", TAP]
        elif target == "conf":
            path = box.conf / "nichooks.conf"
        elif target == "journal":
            path = box.state / "nics" / f"{KEY}.json"
            env = box.nic_env("ext")
        elif target == "tap-index":
            path = box.state / "taps" / TAP
            env = box.nic_env("ext")
            (box.state / "taps").rmdir()
        elif target == "ifup.d":
            path = box.conf / "ifup.d"
            env = box.nic_env("ext")
        elif target == "ifdown.d":
            path = box.conf / "ifdown.d"
            argv, entry = ["kvm-ifdown", TAP], "ifdown"
        elif target == "rt_tables":
            path = box.root / "iproute2" / "rt_tables"
            env = box.nic_env("routed", LINK="nhxtable")
        else:
            path = box.ganeti / "xen-hypervisor" / "nic" / "vm1.example.org" / "0"
            box.write("xs/.xl/domname/5", "vm1.example.org")
            box.write("xs/backend/vif/5/0/mac", MAC)
            env = box.env(vif="vif5.0", XENBUS_PATH="backend/vif/5/0", XENSTORE_DIR=str(box.xs),
                          PATH=f"{STANDINS}:/usr/sbin:/usr/bin:/sbin:/bin")
            argv, entry = ["vif-ganeti", "online", "type_if=vif"], "vif"
        _make(kind, path, box)
        owned = [box.xs / "backend/vif/5/0/hotplug-status", box.xs / "backend/vif/5/0/hotplug-error"]
        sandbox.seal(env, *owned)
        outcome = sandbox.call(entry, argv, env, timeout=1 if kind == "fifo" else 5)
        assert outcome.rc in (0, 1, 2)


# -- known bugs in modules this property's author could not change -------------------------------------
@pytest.mark.parametrize("tap", ["../../outside/victim", "../../../../outside/victim"])
def test_journal_tap_with_a_slash_never_leaves_the_state_directory(base_dir: Path, tap: str) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        box.write(f"state/nics/{KEY}.json", json.dumps(_journal(tap=tap)))
        box.write("state/taps/x", KEY)
        env = box.nic_env("ext", INTERFACE="x")
        sandbox.seal(env)
        sandbox.call("ifup", ["kvm-ifup"], env)


def test_warning_lines_are_one_line_each_whatever_the_journal_says(base_dir: Path) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        rec = {"kind": "nonsense", "undo": {}, "step": "x\nnichooks: forged line", "status": "pending"}
        box.write(f"state/nics/{KEY}.json", json.dumps(_journal(records=[rec])))
        box.write(f"state/taps/{TAP}", KEY)
        env = box.env()
        sandbox.seal(env)
        outcome = sandbox.call("ifdown", ["kvm-ifdown", TAP], env)
        assert all(ln.startswith("nichooks: warning: ") for ln in outcome.error_lines())
        assert len(outcome.error_lines()) == 1


def test_a_journal_cannot_make_undo_write_outside_proc_sys(base_dir: Path) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        victim = box.root / "outside" / "victim"
        rel = os.path.relpath(victim, "/proc/sys")
        rec = {"kind": "sysctl.dev", "step": "sysctl", "status": "pending",
               "undo": {"ifindex": 1, "dev": "lo", "key": rel, "old": "overwritten", "new": KEY}}
        box.write(f"state/nics/{KEY}.json", json.dumps(_journal(records=[rec])))
        box.write(f"state/taps/{TAP}", KEY)
        env = box.env()
        sandbox.seal(env)
        sandbox.call("ifdown", ["kvm-ifdown", TAP], env)


@pytest.mark.parametrize("variables", [{"A=B": "x"}, {"MAC": "x\x00y"}, {"PATH": "/nonexistent"}],
                         ids=["equals-in-name", "nul-in-value", "path"])
def test_journal_variables_reach_scripts_only_as_ganeti_variables(
        base_dir: Path, variables: dict[str, str]) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        scripts = box.conf / "ifdown.d"
        scripts.mkdir(mode=0o755)
        script = scripts / "10-path"
        script.write_text(f'#!/bin/sh\necho "$PATH" > {box.state}/seen-path\n')
        script.chmod(0o755)
        box.write(f"state/nics/{KEY}.json", json.dumps(_journal(records=[], variables=variables)))
        box.write(f"state/taps/{TAP}", KEY)
        env = box.env()
        sandbox.seal(env)
        outcome = sandbox.call("ifdown", ["kvm-ifdown", TAP], env)
        assert outcome.rc == 0
        assert (box.state / "seen-path").read_text().strip() == env["PATH"]


def test_announce_error_is_one_line_whatever_the_journal_says(base_dir: Path) -> None:
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        deferred = [{"addr": "192.0.2.9\nnichooks: forged", "dev": "lo"}]
        box.write(f"state/nics/{KEY}.json", json.dumps(_journal(mode="routed", deferred=deferred)))
        box.write(f"state/taps/{TAP}", KEY)
        env = box.env()
        sandbox.seal(env)
        sandbox.call("cli", ["announce", TAP], env)  # the Sandbox checks: one line
