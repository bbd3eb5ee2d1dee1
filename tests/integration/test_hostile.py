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
changes nothing, exit 1 is rolled back, exit 0 is undone exactly by ifdown. Another
(section 12) does the same in every mode - a Linux bridge and a veth tap, a real tap
and a routing table with default routes, a private Open vSwitch - with the hostile
values mixed with valid but odd ones (MTU 68, rule priority 1, the uplink as the tap,
LINK=local...), so that they reach the kernel and OVSDB instead of stopping at "no
such device". Files of the wrong kind are checked one by one, each with the exact
outcome the code prescribes, under strace: every file the kernel opened, symlinks
followed, so a read through a symlink out of its directory is seen.

The figures: each property's example count is a constant below (N_*); `TRIED` counts
the hook calls actually made, and the module prints the total at the end.

The bugs these properties found are fixed; the tests at the end pin the worst of them
(a journal naming files outside the state directory, undo writing outside /proc/sys,
journal variables overriding PATH for the ifdown scripts, lo taken for a tap).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration import hostile_runner
from tests.integration.hostile_runner import Outcome, preload, run_case
from tests.integration.ovs_env import Switch
from tests.support.constants import HAVE_OVS, NO_OVS
from tests.support.netns import Netns, require_root
from tests.support.scripts import write_script
from tests.support.state import names_in

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
N_REAL = 30          # per mode (bridged, routed, OVS): values that reach plumbing on real devices

# No shrinking: a failure is reported with the example as generated, and a failing run
# stays bounded in time (shrinking re-runs hook calls hundreds of times).
COMMON = dict(deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
TRIED: collections.Counter[str] = collections.Counter()
EXITS: collections.Counter[int | None] = collections.Counter()
REAL_FIGURES: dict[str, dict[str, int]] = {}  # mode -> what the real-device examples did

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
            for mode, figures in sorted(REAL_FIGURES.items()):
                reporter.write_line(f"real devices, {mode}: " + ", ".join(
                    f"{what} {n}" for what, n in sorted(figures.items())))


@pytest.fixture(scope="module")
def base_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nh-hostile-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Sandbox:
    """A context manager: a fresh Box, and the checks that hold for every call."""

    def __init__(self, base: Path, runner: NetnsRunner | None = None) -> None:
        self.runner = runner  # calls go to this warm runner in a test namespace, if given
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
             timeout: float = 10.0, trace: bool = False) -> Outcome:
        if self.runner is not None:
            assert not trace, "the namespace runner does not trace"
            outcome = self.runner.call(entry, argv, env, self.box.root / "cwd")
        else:
            TRIED[entry] += 1
            outcome = run_case(entry, argv, env, cwd=str(self.box.root / "cwd"),
                               netns=SCRATCH_NETNS[0], timeout=timeout, trace=trace)
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
            assert names_in(sandbox.state_dir(env), "nics") == [], "a refused ifup left a journal"


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
        assert names_in(box.state, "nics") == [] or outcome.rc == 0


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
                assert names_in(box.state, "nics") == [], names_in(box.state, "nics")
        else:
            assert outcome.rc in (1, 2), where
            lines = outcome.error_lines()
            assert len(lines) == 1 and lines[0].startswith("nichooks: "), where
            if kind != "journal":
                assert names_in(state, "nics") == [], "a refused ifup left a journal" + where
        after = ns.snapshot()
        assert after == before, f"the namespace changed (exit {outcome.rc})" + where
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


# -- 12. hostile values that reach plumbing: real devices in every mode ------------------------------
# The properties above run where no device exists, so every value that passes validation
# stops at "no such device". Here a share of the same hostile values, mixed with valid but
# odd ones (an MTU of 68, rule priority 1, the uplink as the tap, LINK=local, the bridge's
# own MAC...), goes to real devices: a bridge and a veth "tap", a tap and a routing table
# with default routes behind a veth uplink, a private Open vSwitch with a veth port. After
# every call the namespace (links, addresses, rules, routes, proxies, bridge VLANs, the
# sysctls a hook may set, and for OVS its ports, interfaces and flows) is compared with
# the snapshot taken when it was built: exit 1 or 2 leaves it as it was, exit 0 is undone
# exactly by ifdown, and no journal stays.
REAL_TAP = "tap0"
REAL_MODES = ("bridged", "routed", "openvswitch")
TAP_MAC = "aa:00:00:99:88:77"

# A failure at (fail-at), or right after (fail-after), step N, or step N undone behind the
# hook's back before the read-back (drift): rollback on real devices. Knobs a hook does not
# know are ignored.
FAULTS = [f"{kind}:{n}" for kind in ("fail-at", "fail-after", "drift") for n in range(1, 6)]
REAL_COMMON: dict[str, list[str]] = {
    "MAC": ["fe:ff:ff:ff:ff:fe", "02:00:00:00:00:01", TAP_MAC, "00:00:00:00:00:01", "AA:00:00:11:22:33"],
    "MIGRATION_PHASE": ["pre", "post"],
    "NICHOOKS_TEST_FAULT": FAULTS,
    "NICHOOKS_LOCK_TIMEOUT": ["0.001", "1e-3", "3600"],
    "INTERFACE_UUID": [KEY.upper(), OTHER_KEY],
    "INSTANCE": ["x", "web--incoming", "a" * 63 + ".example.org"],
    "TAGS": ["", "a b c", "x" * 100],
}
REAL_VALUES: dict[str, dict[str, list[str]]] = {
    "bridged": {
        "LINK": ["br0", "brv", "brv", "br1", REAL_TAP, "tap0p", "lo", "up0", "nhxnone0"],
        "INTERFACE": [REAL_TAP, "tap0p", "br0", "lo", "up0"],
        "VLAN": [".1", ".4094", ":1:4094", ".100:200:300", ":7", ".5:5"],
        "BRIDGE": ["br1", "brv"],
    },
    "routed": {
        "LINK": ["100", "nhxtable", "nhxhex", "main", "local", "default", "254", "255", "4294967295"],
        "INTERFACE": [REAL_TAP, "up1", "up0", "lo"],
        "IP": ["198.51.100.2", "198.51.100.1", "198.51.100.255", "198.51.100.99", "203.0.113.7",
               "2001:db8:100::50", "2001:db8:100::2", "10.0.0.1"],
        "NETWORK_SUBNET6": ["2001:db8:100::/64", "2001:db8::/48", "2001:db8:100::/128", ""],
        "NETWORK_GATEWAY6": ["2001:db8:100::1", "2001:db8:100::2", "fe80::1", ""],
        "NICHOOKS_RULE_PRIORITY": ["1", "32765", "10000", "20000"],
        "NICHOOKS_ROUTE_PROTO": ["5", "255", "186", "241"],
        "NICHOOKS_UPLINK4": ["up0", "up1", REAL_TAP, "lo", "nhxnone0"],
        "NICHOOKS_UPLINK6": ["up0", "up1", REAL_TAP, "lo", "nhxnone0"],
        "NICHOOKS_MANAGE_SYSCTLS": ["yes", "no"],
        "NICHOOKS_ANNOUNCE": ["yes", "no"],
        "NICHOOKS_TEST_FAULT": FAULTS + [f"fail-at:{n}" for n in range(6, 14)],
    },
    "openvswitch": {
        "NICHOOKS_OVS_MTU": ["68", "576", "1280", "9000", "65535"],
        "VLAN": [".1", ".4094", ":1:4094", ".100:200", ":7"],
        "LINK": ["br0", "lbr0", REAL_TAP, "tap0p", "lo", "nhxnone0"],
        "INTERFACE": [REAL_TAP, "tap0p", "br0", "lbr0"],
        "NICHOOKS_OVS_ANTISPOOF": ["on", "mac", "off"],
        "IP": ["192.0.2.255", "2001:db8::1", "0.0.0.1", "198.51.100.7"],
        "NETWORK_SUBNET6": ["2001:db8::/64", "2001:db8::/56"],
        "NICHOOKS_OVS_TIMEOUT": ["1", "3600"],
    },
}
# Where an empty value means the default, and the default is the machine's own (its
# state directory, its Open vSwitch...): never empty here.
NEVER_EMPTY = ("NICHOOKS_STATE_DIR", "NICHOOKS_CONF_DIR", "NICHOOKS_OVSDB", "OVS_RUNDIR",
               "GANETI_RUN_DIR", "NICHOOKS_IPROUTE2_DIR")


def _merged(*parts: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in parts:
        out.update(part)
    return out


def real_env_changes(mode: str) -> st.SearchStrategy[dict[str, str]]:
    """One to three of the variables and settings that reach this mode's plumbing, with
    valid but odd values; in about one example of three a fault injected at a step; in
    about one of two, one more variable or setting of ENV_NAMES with any hostile value
    (which may replace an odd one)."""
    odd = {**REAL_COMMON, **REAL_VALUES[mode]}
    odd_changes = st.lists(st.sampled_from(sorted(odd)), min_size=1, max_size=3, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({n: st.sampled_from(odd[n]) for n in chosen}))
    fault = st.one_of(st.just({}), st.just({}), st.fixed_dictionaries(
        {"NICHOOKS_TEST_FAULT": st.sampled_from(odd["NICHOOKS_TEST_FAULT"])}))
    names = tuple(n for n in ENV_NAMES if n not in NEVER_EMPTY)
    hostile = st.one_of(st.just({}), st.just({}), hostile_env_changes(names, max_size=1),
                        hostile_env_changes(NEVER_EMPTY, max_size=1).filter(lambda c: all(c.values())))
    return st.builds(_merged, odd_changes, fault, hostile)


def _veth(ns: Netns, name: str, peer: str) -> None:
    ns.ip("link", "add", name, "type", "veth", "peer", "name", peer)


class RealSite:
    """One mode's namespace with real devices, a warm runner inside it, and what is
    compared before and after each call."""

    def __init__(self, mode: str, ns: Netns, root: Path, switch: Switch | None = None) -> None:
        self.mode, self.ns, self.switch = mode, ns, switch
        self.runner = NetnsRunner(ns, root)
        # Every example is compared with this, not with a snapshot of its own: one that
        # left something behind fails again when hypothesis replays it, instead of
        # passing on the namespace it changed.
        self.baseline = self.snapshot()

    def base_env(self, box: Box) -> dict[str, str]:
        nic = {"INSTANCE": "vm1.example.org", "MAC": "aa:00:00:11:22:33", "MODE": self.mode,
               "INTERFACE": REAL_TAP, "INTERFACE_INDEX": "0", "INTERFACE_UUID": KEY, "TAGS": "web",
               "VLAN": "", "LINK": "br0"}
        if self.mode == "routed":
            box.write("iproute2/rt_tables", "100\tnhxtable\n0x65\tnhxhex\n")
            nic.update(LINK="100", IP="198.51.100.50", NETWORK_SUBNET6="2001:db8:100::/64",
                       NETWORK_GATEWAY6="2001:db8:100::1")
        if self.switch is not None:
            nic.update(IP="192.0.2.10", NICHOOKS_OVSDB=self.switch.db, OVS_RUNDIR=str(self.switch.dir),
                       NICHOOKS_OVS_TIMEOUT="10")
        return box.env(**nic)

    def snapshot(self) -> dict[str, Any]:
        snap = self.ns.snapshot()
        keys = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.all.proxy_ndp"]
        for link in snap["links"]:
            name = link["ifname"]
            keys += [f"net.ipv4.conf.{name}.proxy_arp", f"net.ipv4.conf.{name}.forwarding",
                     f"net.ipv6.conf.{name}.forwarding", f"net.ipv6.conf.{name}.proxy_ndp",
                     f"net.ipv6.conf.{name}.accept_ra"]
        sysctls = self.ns.run("sysctl", "-e", *keys, check=False).stdout.splitlines()
        assert len(sysctls) >= 3, "sysctl read nothing"
        snap["sysctls"] = sorted(sysctls)
        if self.switch is not None:
            snap["ovs"] = self._ovs()
        return snap

    def _ovs(self) -> dict[str, Any]:
        """Ports, interfaces and flows, read with ovs-vsctl and ovs-ofctl."""
        assert self.switch is not None

        def rows(table: str, columns: str) -> list[str]:
            assert self.switch is not None
            data = json.loads(self.switch.vsctl("--format=json", f"--columns={columns}", "list", table))
            return sorted(json.dumps(row, sort_keys=True) for row in data["data"])

        return {"ports": rows("Port", "name,tag,trunks,vlan_mode,external_ids"),
                "interfaces": rows("Interface", "name,type,mtu_request,external_ids"),
                "flows": sorted(self.switch.flows("br0"))}

    def assert_unchanged(self, before: dict[str, Any], message: str) -> None:
        """Equal to `before`; polled for a while where a daemon applies changes after the
        call returned (ovs-vswitchd), at once on the kernel alone."""
        deadline = time.monotonic() + (15 if self.switch is not None else 3)
        while True:
            now = self.snapshot()
            if now == before:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{message}\n{_snapshot_diff(before, now)}")
            time.sleep(0.1)

    def close(self) -> None:
        self.runner.close()


def _snapshot_diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What changed, part by part: for a list, the entries gone and the entries new."""
    out = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out.append(f"{key}: {_snapshot_diff(old, new)}")
        elif isinstance(old, list) and isinstance(new, list):
            dumped_old = [json.dumps(x, sort_keys=True) for x in old]
            dumped_new = [json.dumps(x, sort_keys=True) for x in new]
            out.append(f"{key}: gone {[x for x in dumped_old if x not in dumped_new]}, "
                       f"new {[x for x in dumped_new if x not in dumped_old]}")
        else:
            out.append(f"{key}: {old!r} -> {new!r}")
    return "; ".join(out)


@contextlib.contextmanager
def _site(mode: str, build: Callable[[Netns, Path], Switch | None]) -> Iterator[RealSite]:
    require_root()
    ns = Netns()
    root = Path(tempfile.mkdtemp(prefix=f"nh-hostile-{mode}-"))
    switch = None
    try:
        switch = build(ns, root)
        site = RealSite(mode, ns, root, switch)
        try:
            yield site
        finally:
            site.close()
    finally:
        if switch is not None:
            switch.stop()
        ns.delete()
        shutil.rmtree(root, ignore_errors=True)


def _build_bridged(ns: Netns, root: Path) -> None:
    """br0 (MTU 1400, up, an address), brv (MTU 9000, up, VLAN filtering where the kernel
    has it: this one's has not), br1 (MTU 576, down); the veth tap0 (peer
    tap0p, up); up0, a plain device. Bridges get fixed MACs: one without takes its
    lowest port's, and falls back when the port leaves."""
    for name, mac, mtu in (("br0", "02:00:00:00:00:01", "1400"), ("brv", "02:00:00:00:00:03", "9000"),
                           ("br1", "02:00:00:00:00:02", "576")):
        if name == "brv":
            ns.ip("link", "add", name, "type", "bridge", "vlan_filtering", "1", check=False)
        if not ns.has_link(name):
            ns.ip("link", "add", name, "type", "bridge")
        ns.ip("link", "set", name, "address", mac, "mtu", mtu)
    ns.ip("link", "set", "br0", "up")
    ns.ip("link", "set", "brv", "up")
    ns.ip("addr", "add", "192.0.2.1/24", "dev", "br0")
    _veth(ns, REAL_TAP, "tap0p")
    ns.ip("link", "set", REAL_TAP, "address", TAP_MAC)
    ns.ip("link", "set", "tap0p", "up")
    _veth(ns, "up0", "up0p")
    ns.ip("link", "set", "up0", "up")


def _build_routed(ns: Netns, root: Path) -> None:
    """A real tap (tap0); the uplink up0 (veth, up, addresses, the default routes in main
    and table 100) and a second one, up1; the operator's rule for traffic from the uplink
    (priority 10000) and a host route of his in table 100. A ready routed host: forwarding
    on, proxy_ndp on, so no shared sysctl is missing (those are set, never undone)."""
    ns.ip("tuntap", "add", "dev", REAL_TAP, "mode", "tap")
    ns.ip("link", "set", REAL_TAP, "address", TAP_MAC)
    for up, addr in (("up0", "198.51.100.2/24"), ("up1", "203.0.113.2/24")):
        _veth(ns, up, up + "p")
        ns.ip("addr", "add", addr, "dev", up)
        ns.ip("link", "set", up + "p", "up")
        ns.ip("link", "set", up, "up")
    ns.ip("link", "set", "up0", "address", "02:00:00:00:01:02")
    ns.ip("-6", "addr", "add", "2001:db8:100::2/64", "dev", "up0", "nodad")
    for table in ("main", "100"):
        ns.ip("route", "add", "default", "via", "198.51.100.1", "dev", "up0", "table", table)
        ns.ip("-6", "route", "add", "default", "via", "2001:db8:100::1", "dev", "up0", "table", table)
    ns.ip("rule", "add", "iif", "up0", "lookup", "100", "priority", "10000")
    ns.ip("route", "add", "198.51.100.99", "dev", "up1", "table", "100")
    ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
           "net.ipv6.conf.all.proxy_ndp=1", "net.ipv6.conf.up0.accept_ra=0")


def _build_openvswitch(ns: Netns, root: Path) -> Switch:
    """A private ovsdb-server and ovs-vswitchd in the namespace, OVS bridge br0 (its MTU
    pinned, as an operator's is: otherwise OVS lowers it to its smallest port's), the
    veth tap0 (peer tap0p, up) and a Linux bridge lbr0."""
    if not HAVE_OVS:
        pytest.skip(NO_OVS)
    switch = Switch(ns, root)
    try:
        switch.start()
        switch.add_bridge("br0")
        switch.vsctl("set", "Interface", "br0", "mtu_request=1500")
        _veth(ns, REAL_TAP, "tap0p")
        ns.ip("link", "set", REAL_TAP, "address", TAP_MAC)
        ns.ip("link", "set", "tap0p", "up")
        ns.ip("link", "add", "lbr0", "type", "bridge")
    except BaseException:
        switch.stop()
        raise
    return switch


@pytest.fixture(scope="module")
def real_bridged() -> Iterator[RealSite]:
    with _site("bridged", _build_bridged) as site:
        yield site


@pytest.fixture(scope="module")
def real_routed() -> Iterator[RealSite]:
    with _site("routed", _build_routed) as site:
        yield site


@pytest.fixture(scope="module")
def real_openvswitch() -> Iterator[RealSite]:
    with _site("openvswitch", _build_openvswitch) as site:
        yield site


def _journaled(state: Path) -> list[str]:
    """Journals and tap index entries under `state`; none where no directory can be (a
    state directory setting the hook refused: too long, not a directory)."""
    try:
        return names_in(state, "nics") + names_in(state, "taps")
    except OSError:
        return []


def _real_example(site: RealSite, base_dir: Path, changes: dict[str, str],
                  counts: collections.Counter[str]) -> None:
    sandbox = Sandbox(base_dir, runner=site.runner)
    with sandbox as box:
        changes = {k: box.fill(v) for k, v in changes.items()}
        env = {**site.base_env(box), **changes}
        where = f"\n{site.mode}: {changes!r}"
        sandbox.seal(env)
        state = sandbox.state_dir(env)
        before = site.baseline
        # The Sandbox checks every call: exit 0, 1 or 2; one `nichooks: ` line for 1 and
        # 2, warnings only for 0; no traceback, no shell, nothing written outside the
        # state directory (and /proc/sys/net), nothing changed in the box around it.
        up = sandbox.call("ifup", ["kvm-ifup", REAL_TAP], env)
        where += f"\nifup: exit {up.rc}, stderr {up.stderr!r}"
        if up.rc == 0:
            plugged = site.snapshot() != before
            down = sandbox.call("ifdown", ["kvm-ifdown", REAL_TAP], env)
            assert (down.rc, down.stderr) == (0, ""), f"ifdown: {down.rc} {down.stderr!r}" + where
            assert _journaled(state) == [], f"ifdown left {_journaled(state)}" + where
            site.assert_unchanged(before, "ifdown did not restore the namespace" + where)
            counts["plugged and undone" if plugged else "exit 0, nothing plugged"] += 1
        else:
            assert _journaled(state) == [], f"a failed ifup left {_journaled(state)}" + where
            site.assert_unchanged(before, f"ifup exited {up.rc} and changed the namespace" + where)
            line = up.error_lines()[0]
            step = re.search(r": step ([^:]+):", line)
            counts[f"exit {up.rc}" + (" after a change, rolled back" if step and step.group(1) not in
                                      ("preflight", "lock") else "")] += 1


@pytest.mark.parametrize("mode", REAL_MODES)
def test_hostile_environment_on_real_devices(request: pytest.FixtureRequest, base_dir: Path,
                                             mode: str) -> None:
    """Hostile and odd values for the variables and settings that reach plumbing, on
    real devices in `mode`: the call's own properties as everywhere, plus the namespace
    as it was after exit 1 or 2, and restored by ifdown after exit 0, with no journal."""
    site: RealSite = request.getfixturevalue(f"real_{mode}")
    counts: collections.Counter[str] = collections.Counter()

    @settings(max_examples=N_REAL, **COMMON)
    @given(changes=real_env_changes(mode))
    def examples(changes: dict[str, str]) -> None:
        _real_example(site, base_dir, changes, counts)

    examples()
    REAL_FIGURES[mode] = dict(counts)
    # Not vacuous: values did reach plumbing, which was undone or rolled back.
    assert counts["plugged and undone"] >= N_REAL // 6, counts
    assert counts["exit 1 after a change, rolled back"] >= 2, counts


def test_loopback_is_not_taken_for_a_tap(real_bridged: RealSite, base_dir: Path) -> None:
    """INTERFACE=lo: refused before any change. Taken for a tap, it got our MAC, and its
    all-zero MAC could never be restored (EADDRNOTAVAIL, which undo took for 'gone')."""
    counts: collections.Counter[str] = collections.Counter()
    _real_example(real_bridged, base_dir, {"INTERFACE": "lo"}, counts)
    assert counts == collections.Counter({"exit 1": 1}), counts


# -- files of the wrong kind ------------------------------------------------------------------------
FILE_KINDS = ["directory", "fifo", "loop", "dangling", "outside", "big", "empty"]
WRONG_KIND_TARGETS = ("spec", "conf", "journal", "tap-index", "xen-nic", "rt_tables", "ifup.d",
                      "ifdown.d")
BIG = 2 << 20  # 2 MiB: above every cap but the journal's (4 MiB)


def _padded(head: str, filler: bytes = b"#") -> bytes:
    """`head`, then a comment (or blanks) up to 2 MiB: content that would be read as valid
    if a size cap were missing, so that a missing cap changes the outcome."""
    data = head.encode()
    return data + filler * (BIG - len(data) - 1) + b"\n"


def _big_content(target: str) -> bytes:
    if target == "spec":  # a whole NIC description, then a 2 MiB comment line
        return _padded("\n".join(SPEC_BASE) + "\n")
    if target == "xen-nic":
        return _padded(XEN_NIC_FILE)
    if target == "conf":
        return _padded("[nichooks]\nNICHOOKS_LOCK_TIMEOUT = 5\n")
    if target == "journal":  # a valid journal: 2 MiB is within the journal's 4 MiB cap
        return _padded(json.dumps(_journal(mode="ext", records=[])), b" ")
    if target == "tap-index":
        return _padded(KEY, b" ")
    if target == "rt_tables":  # names the table LINK asks for, were it read
        return _padded("100\tnhxtable\n")
    return b"A" * BIG


def _make(kind: str, path: Path, box: Box, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)  # whatever the umask: trusted, as root's own directories are
    if kind == "directory":
        path.mkdir(mode=0o755)
        path.chmod(0o755)
    elif kind == "fifo":
        os.mkfifo(path, 0o644)
    elif kind == "loop":
        os.symlink(path.name, path)
    elif kind == "dangling":
        os.symlink(box.root / "nowhere", path)
    elif kind == "outside":
        os.symlink(box.root / "outside" / "victim", path)
    elif kind == "big":
        path.write_bytes(_big_content(target))
    elif kind == "empty":
        path.write_bytes(b"")


def _untrusted_on_the_way(path: Path) -> Path | None:
    """The first directory on the way from / to `path` that someone other than root owns
    or may write (a sticky /tmp too), found here from lstat: a script walk that follows
    a symlink to an absolute path under `path` passes through it."""
    current = Path("/")
    for part in Path(os.path.abspath(path)).parts:
        current = current / part
        info = os.lstat(current)
        if info.st_uid != 0 or info.st_mode & 0o022:
            return current
    return None


@dataclass
class WrongKind:
    """What one call must do when one file it reads is of the wrong kind."""

    rc: int
    lines: list[str]             # regular expressions, one per stderr line, matched in full
    after: str                   # what the state directory holds afterwards (_check_after)
    reads_victim: bool = False   # whether it reads outside/victim through the symlink


def _exact(*lines: str) -> list[str]:
    return [re.escape(line) for line in lines]


def _expected_wrong_kind(target: str, kind: str, box: Box, path: Path) -> WrongKind:
    """Read off the code (safefile.read_regular, settings._read_conf,
    shellvars.read_assignments, Store.load / tap_owner / claim_tap, routed.resolve_table,
    custom._walk), not recorded from a run."""
    eloop = os.strerror(errno.ELOOP)
    label = f"vm1.example.org {TAP} ({KEY})"
    outside = kind == "outside"
    if target in ("spec", "xen-nic"):
        not_regular = _exact(f"nichooks: {path}: is not a regular file: not a NIC description")
        no_file = (_exact(f"nichooks: MODE: is not set and there is no spec file {path}") if target == "spec"
                   else _exact("nichooks: step xen: no NIC file, and xenstore backend/vif/5/0 has neither "
                               "bridge nor ip"))  # xenstore describes the NIC: a MAC only, here
        empty = (_exact("nichooks: MODE: is not set (one of: bridged, openvswitch, routed, ext)")
                 if target == "spec" else _exact(f"nichooks: {path}: sets no MODE (not a NIC file Ganeti "
                                                  "wrote)"))
        lines = {"directory": not_regular, "fifo": not_regular,
                 "loop": _exact(f"nichooks: {path}: cannot be read: {eloop}"),
                 "dangling": no_file,
                 "outside": _exact(f"nichooks: {path}:1: '{KEY}' is not an assignment: bash would run it "
                                   "as a command"),
                 "big": _exact(f"nichooks: {path}: is larger than {64 * 1024} bytes: not a NIC description"),
                 "empty": empty}[kind]
        rc = 1 if (target, kind) == ("xen-nic", "dangling") else 2
        return WrongKind(rc, lines, "unchanged", reads_victim=outside)
    if target == "conf":
        # Not a regular file, or none at all: no settings file (a FIFO must not block);
        # the call then fails where the bridge does not exist, as without one.
        if kind in ("directory", "fifo", "dangling", "empty"):
            return WrongKind(1, _exact(f"nichooks: {label}: step preflight: LINK {BRIDGE}: no such device"),
                             "nothing journaled")
        return WrongKind(2, {
            "loop": _exact(f"nichooks: {path}: cannot be read: {eloop}"),
            "outside": _exact(f"nichooks: {path}: unreadable settings file: File contains no section "
                              "headers."),
            "big": _exact(f"nichooks: {path}: cannot be read: is larger than {1 << 20} bytes")}[kind],
            "unchanged", reads_victim=outside)
    if target == "journal":
        # Unreadable: moved to corrupt/ as it is, and the NIC plugged afresh. No file
        # (dangling): the new journal replaces the link. 2 MiB is within the 4 MiB cap:
        # loaded, converged (nothing to undo), replaced.
        quarantined = kind in ("directory", "fifo", "loop", "outside", "empty")
        return WrongKind(0, [], "plugged, quarantined" if quarantined else "plugged", reads_victim=outside)
    if target == "tap-index":
        if kind == "directory":  # the entry cannot be renamed over a directory: rolled back
            return WrongKind(1, _exact(f"nichooks: {label}: step journal: {path} is a directory "
                                       "nichooks did not make; remove it"), "no journal")
        # Not a file of ours (or, through the outside link, naming this very NIC): the
        # entry is replaced by ours.
        return WrongKind(0, [], "plugged", reads_victim=outside)
    if target == "rt_tables":
        # Too big, not a file, or not naming it: the table is not found, before any change.
        return WrongKind(1, _exact(f"nichooks: {label}: step preflight: routing table 'nhxtable' (LINK) is "
                                   f"not named in {path.parent}/rt_tables or rt_tables.d/*.conf"),
                         "nothing journaled", reads_victim=outside)
    # The script directories (custom._walk, one component at a time): refused when not a
    # directory, when a symlink loops, or when a symlink leads through a directory someone
    # else may write; a symlink to nothing means no scripts. Never read through a link.
    untrusted = _untrusted_on_the_way(box.root)
    cause: str | None
    if kind == "directory":
        cause = None
    elif kind in ("fifo", "big", "empty"):
        cause = re.escape("refusing to run scripts: not a directory")
    elif kind == "loop":
        cause = re.escape(f"refusing to run scripts: {eloop}")
    elif untrusted is not None:  # dangling, outside: through /tmp (or wherever the box is)
        cause = re.escape(f"refusing to run scripts: {untrusted} is ") + ".+"
    else:
        cause = re.escape("refusing to run scripts: not a directory") if outside else None
    if target == "ifup.d":  # a refusal fails the ifup, which is rolled back
        if cause is None:
            return WrongKind(0, [], "plugged")
        return WrongKind(1, [re.escape(f"nichooks: {label}: step custom script: custom script failed: ")
                             + cause], "nothing journaled")
    # ifdown.d: the journal is undone first; a refusal is then a warning, not a failure
    return WrongKind(0, [] if cause is None else [re.escape(f"nichooks: warning: {TAP}: custom script: ")
                                                  + cause], "nothing journaled")


def _check_after(expect: WrongKind, box: Box, before: dict[str, tuple[Any, ...]], kind: str,
                 planted: tuple[Any, ...] | None) -> None:
    """The state directory afterwards, read here with plain file reads."""
    state = box.state
    if expect.after == "unchanged":  # invalid input changes nothing, not even the state dir
        assert _tree(state, ()) == before, "the state directory changed"
    elif expect.after == "nothing journaled":
        journaled = (names_in(state, "nics"), names_in(state, "taps"))
        assert journaled == ([], []), journaled
    elif expect.after == "no journal":  # rolled back; what was in the way stays in the way
        assert names_in(state, "nics") == [], names_in(state, "nics")
        assert stat.S_ISDIR(os.lstat(state / "taps" / TAP).st_mode)
    elif expect.after.startswith("plugged"):
        journal_path = state / "nics" / f"{KEY}.json"
        assert stat.S_ISREG(os.lstat(journal_path).st_mode), "no journal file"
        data = json.loads(journal_path.read_text())
        assert (data["key"], data["tap"], data["mode"], data["state"]) == (KEY, TAP, "ext", "applied"), data
        entry = state / "taps" / TAP
        assert stat.S_ISREG(os.lstat(entry).st_mode) and entry.read_text() == KEY
        corrupt = sorted(os.listdir(state / "corrupt")) if (state / "corrupt").exists() else []
        if expect.after == "plugged, quarantined":  # moved as it was: same kind, same target
            assert len(corrupt) == 1 and re.fullmatch(re.escape(f"{KEY}.json.") + "[0-9]+", corrupt[0]), \
                corrupt
            moved = os.lstat(state / "corrupt" / corrupt[0])
            link = os.readlink(state / "corrupt" / corrupt[0]) if stat.S_ISLNK(moved.st_mode) else None
            assert (stat.S_IFMT(moved.st_mode), link) == planted, f"{kind} quarantined as {moved}"
        else:
            assert corrupt == [], corrupt


def _wrong_kind_params() -> list[Any]:
    return [pytest.param(target, kind, id=f"{target}-{kind}")
            for target in WRONG_KIND_TARGETS for kind in FILE_KINDS]


@pytest.mark.parametrize(("target", "kind"), _wrong_kind_params())
def test_files_of_the_wrong_kind(base_dir: Path, target: str, kind: str) -> None:
    """Every file a hook reads, replaced by a directory, a FIFO, a symlink loop, a
    dangling symlink, a symlink out of its directory, 2 MiB or nothing: the exact exit
    status and error line each must give (or the exact success), what the state
    directory holds afterwards, and every file read or written, as strace saw the
    kernel open it: a read through the symlink out must be there when the code
    follows it, and no other read outside the directories the call reads."""
    if hostile_runner.strace_path() is None:
        pytest.fail("strace is needed to see what a hook opens: install the Debian package strace")
    sandbox = Sandbox(base_dir)
    with sandbox as box:
        victim = box.root / "outside" / "victim"
        victim.chmod(0o644)  # trusted, whatever the umask: a settings file there is read
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
        elif target == "ifup.d":
            path = box.conf / "ifup.d"
            env = box.nic_env("ext")
        elif target == "ifdown.d":
            # a plug to undo, so that ifdown goes on to its scripts
            path = box.conf / "ifdown.d"
            box.write(f"state/nics/{KEY}.json", json.dumps(_journal(mode="ext", records=[])))
            box.write(f"state/taps/{TAP}", KEY)
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
        _make(kind, path, box, target)
        planted_info = os.lstat(path)
        planted = (stat.S_IFMT(planted_info.st_mode),
                   os.readlink(path) if stat.S_ISLNK(planted_info.st_mode) else None)
        expect = _expected_wrong_kind(target, kind, box, path)
        owned = [box.xs / "backend/vif/5/0/hotplug-status", box.xs / "backend/vif/5/0/hotplug-error"]
        sandbox.seal(env, *owned)
        state_before = _tree(box.state, ())
        outcome = sandbox.call(entry, argv, env, timeout=5 if kind == "fifo" else 10, trace=True)
        where = f"\n{target} {kind}: rc {outcome.rc}, stderr {outcome.stderr!r}"

        assert outcome.rc == expect.rc, f"exit status {outcome.rc}, expected {expect.rc}" + where
        lines = outcome.error_lines()
        assert len(lines) == len(expect.lines) and all(
            re.fullmatch(want, line) for want, line in zip(expect.lines, lines, strict=True)), \
            f"stderr lines {lines!r}, expected to match {expect.lines!r}" + where
        _check_after(expect, box, state_before, kind, planted)
        if entry == "vif" and outcome.rc != 0:  # libxl is told why, as Xen's own scripts do
            assert (box.xs / "backend/vif/5/0/hotplug-status").read_text() == "error", where
            assert (box.xs / "backend/vif/5/0/hotplug-error").read_text() == \
                lines[0].removeprefix("nichooks: "), where

        # What the kernel opened, followed symlinks resolved: reads outside the places
        # this call reads from are exactly the one through the outside link, if the code
        # follows it; writes only in the state directory and the owned xenstore keys.
        readable = [box.state, box.conf, box.ganeti, box.xs, box.root / "iproute2"]
        reads = [p for p in outcome.opened_under(str(box.root), "read")
                 if not any(p == str(d) or p.startswith(f"{d}/") for d in readable)]
        assert reads == ([str(victim)] if expect.reads_victim else []), \
            f"read outside what it reads: {reads}" + where
        writes = [p for p in outcome.opened_under(str(box.root), "write")
                  if not (p.startswith(f"{box.state}/") or p in map(str, owned))]
        assert writes == [], f"opened for writing outside the state directory: {writes}" + where
        assert victim.read_text() == KEY, where


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
        write_script(box.conf / "ifdown.d", "10-path", f'echo "$PATH" > {box.state}/seen-path')
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
