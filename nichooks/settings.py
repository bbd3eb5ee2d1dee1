"""Settings: each from the environment first, then the settings file, then a default.

The names are an interface (docs/architecture.md, "Interfaces"). The file is read only
when it exists, with configparser (imported lazily: most hooks on a default install
never need it).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nichooks.errors import InvalidInput, UntrustedPath

DEFAULTS: dict[str, str] = {
    "NICHOOKS_STATE_DIR": "/run/nichooks",
    "NICHOOKS_CONF_DIR": "/etc/nichooks",
    "GANETI_RUN_DIR": "/var/run/ganeti",
    "NICHOOKS_OVSDB": "unix:/var/run/openvswitch/db.sock",
    "OVS_RUNDIR": "/var/run/openvswitch",
    "NICHOOKS_LOCK_TIMEOUT": "30",
    "NICHOOKS_SCRIPT_TIMEOUT": "60",
    "NICHOOKS_DEBUG": "0",
    # routed mode
    "NICHOOKS_RULE_PRIORITY": "20000",
    "NICHOOKS_ROUTE_PROTO": "241",
    "NICHOOKS_UPLINK4": "",
    "NICHOOKS_UPLINK6": "",
    "NICHOOKS_MANAGE_SYSCTLS": "no",
    "NICHOOKS_ANNOUNCE": "1",
    "NICHOOKS_IPROUTE2_DIR": "/etc/iproute2",
    # every mode: anti-spoofing filters (nftables; OpenFlow flows in openvswitch mode)
    "NICHOOKS_ANTISPOOF": "on",
    # openvswitch mode
    "NICHOOKS_OVS_TIMEOUT": "10",
    "NICHOOKS_OVS_ANTISPOOF": "",  # deprecated alias of NICHOOKS_ANTISPOOF
    "NICHOOKS_OVS_MTU": "",
    # the agent
    "NICHOOKS_AGENT_INTERVAL": "2",
}

_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")

CONF_SECTION = "nichooks"


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    conf_dir: Path
    ganeti_run_dir: Path
    ovsdb: str
    ovs_rundir: Path
    lock_timeout: float
    script_timeout: float
    debug: bool
    rule_priority: int
    route_proto: int
    uplink4: str | None
    uplink6: str | None
    manage_sysctls: bool
    announce: bool
    iproute2_dir: Path
    ovs_timeout: float
    antispoof: str  # on (MAC and known IPs), mac (MAC only), off: every mode
    ovs_mtu: int | None  # None: the bridge's MTU
    agent_interval: float
    sources: Mapping[str, str]  # setting -> "env", "file <path>" or "default"

    @property
    def nics_dir(self) -> Path:
        return self.state_dir / "nics"

    @property
    def specs_dir(self) -> Path:
        return self.state_dir / "specs"


MAX_CONF = 1 << 20


def _read_conf(path: Path) -> dict[str, str]:
    """KEY = value lines under [nichooks]; keys as in the environment, any case.

    Only a regular file is read (a FIFO there would block every hook); a path that
    cannot even be looked at (a component that is a file, a loop) is an error. The
    file decides where root's scripts come from and whether guests are filtered:
    it, and the directory it is in, must be root's alone. It is checked through the
    descriptor it is then read from, so it cannot be swapped in between."""
    from nichooks.safefile import OPEN_FLAGS, read_fd
    from nichooks.trust import untrusted_reason

    try:
        fd = os.open(path, OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise InvalidInput(str(path), f"cannot be read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return {}
        reason = untrusted_reason(path, info) or untrusted_reason(path.parent, path.parent.stat())
        if reason:
            raise UntrustedPath(f"refusing the settings file: {reason}; fix with: "
                                f"chown root:root {path} {path.parent} && "
                                f"chmod go-w {path} {path.parent}")
        try:
            text = read_fd(fd, MAX_CONF).decode("utf-8")
        except (OSError, ValueError) as exc:
            raise InvalidInput(str(path), f"cannot be read: {exc}") from None
    finally:
        os.close(fd)
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise InvalidInput(str(path), f"unreadable settings file: {exc}".splitlines()[0]) from None
    if not parser.has_section(CONF_SECTION):
        return {}
    return {k.upper(): v.strip() for k, v in parser.items(CONF_SECTION)}


def _number(name: str, text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise InvalidInput(name, f"{text!r} ({where}) is not a number of seconds in (0, 3600]")
    return value


def _flag(name: str, text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise InvalidInput(name, f"{text!r} is not yes or no")


def _choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    if text.lower() not in choices:
        raise InvalidInput(name, f"{text!r} is not one of: {', '.join(choices)}")
    return text.lower()


_SMALL_NUMBER = re.compile(r"[0-9]{1,9}")


def _int(name: str, text: str, low: int, high: int) -> int:
    """ASCII digits, a handful of them: str.isdigit() is true for '²', which int()
    refuses, and int() of thousands of digits raises past Python's digit limit."""
    if not _SMALL_NUMBER.fullmatch(text) or not low <= int(text) <= high:
        raise InvalidInput(name, f"{text[:40]!r} is not a number in {low}..{high}")
    return int(text)


PATH_MAX = 4096
NAME_MAX = 255
PATH_SETTINGS = ("NICHOOKS_STATE_DIR", "NICHOOKS_CONF_DIR", "GANETI_RUN_DIR", "OVS_RUNDIR",
                 "NICHOOKS_IPROUTE2_DIR")


def _directory(name: str, text: str) -> Path:
    """An absolute directory path the kernel can take: no control characters (a
    newline would forge log and error lines), no component longer than NAME_MAX and
    no path longer than PATH_MAX (either makes every call fail with ENAMETOOLONG,
    deep inside whatever first touches it)."""
    if not text.startswith("/"):
        raise InvalidInput(name, f"{text[:80]!r} is not an absolute path")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidInput(name, f"{text[:80]!r} contains a control character")
    raw = os.fsencode(text)
    if len(raw) >= PATH_MAX - NAME_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise InvalidInput(name, f"{text[:80]!r}... is too long for a path")
    return Path(text)


def _state_dir(text: str) -> Path:
    """The state directory, or a path where it can be made: refused when it, or
    something on the way to it, exists and is not a directory (journals, locks and
    the tap index could then never be written, and every hook would fail late)."""
    path = _directory("NICHOOKS_STATE_DIR", text)
    try:
        info = path.stat()
    except FileNotFoundError:
        return path
    except OSError as exc:  # ENOTDIR (a file on the way), ELOOP
        raise InvalidInput("NICHOOKS_STATE_DIR", f"{text!r}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidInput("NICHOOKS_STATE_DIR", f"{text!r} exists and is not a directory")
    return path


def _uplink(name: str, text: str) -> str | None:
    if not text:
        return None
    from nichooks.model.validate import ifname

    return ifname(name, text)


def _antispoof(values: Mapping[str, str], sources: Mapping[str, str]) -> str:
    """NICHOOKS_ANTISPOOF, or the deprecated NICHOOKS_OVS_ANTISPOOF where only that one
    is set (it meant the same for openvswitch NICs before every mode was filtered)."""
    name = "NICHOOKS_ANTISPOOF"
    if sources[name] == "default" and values["NICHOOKS_OVS_ANTISPOOF"]:
        name = "NICHOOKS_OVS_ANTISPOOF"
    return _choice(name, values[name], ("on", "mac", "off"))


def effective(env: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(name, value, where it came from) for every setting, for `nichooks config`."""
    settings = load(env)
    env = os.environ if env is None else env
    conf = _read_conf(settings.conf_dir / "nichooks.conf")
    rows = []
    for name, default in DEFAULTS.items():
        source = settings.sources[name]
        value = env[name] if source == "env" else conf.get(name, default) if source != "default" \
            else default
        rows.append((name, value, source))
    return rows


def load(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    conf_dir = _directory("NICHOOKS_CONF_DIR",
                          env.get("NICHOOKS_CONF_DIR") or DEFAULTS["NICHOOKS_CONF_DIR"])
    conf_path = conf_dir / "nichooks.conf"
    conf = _read_conf(conf_path)
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name, default in DEFAULTS.items():
        if env.get(name):
            values[name], sources[name] = env[name], "env"
        elif name != "NICHOOKS_CONF_DIR" and conf.get(name):
            values[name], sources[name] = conf[name], f"file {conf_path}"
        else:
            values[name], sources[name] = default, "default"
    for name in PATH_SETTINGS:
        _directory(name, values[name])
    return Settings(
        state_dir=_state_dir(values["NICHOOKS_STATE_DIR"]),
        conf_dir=conf_dir,
        ganeti_run_dir=Path(values["GANETI_RUN_DIR"]),
        ovsdb=values["NICHOOKS_OVSDB"],
        ovs_rundir=Path(values["OVS_RUNDIR"]),
        lock_timeout=_number("NICHOOKS_LOCK_TIMEOUT", values["NICHOOKS_LOCK_TIMEOUT"],
                             sources["NICHOOKS_LOCK_TIMEOUT"]),
        script_timeout=_number("NICHOOKS_SCRIPT_TIMEOUT", values["NICHOOKS_SCRIPT_TIMEOUT"],
                               sources["NICHOOKS_SCRIPT_TIMEOUT"]),
        debug=values["NICHOOKS_DEBUG"].lower() in _TRUE,
        # 32766 and 32767 are the kernel's main and default rules: stay before them.
        rule_priority=_int("NICHOOKS_RULE_PRIORITY", values["NICHOOKS_RULE_PRIORITY"], 1, 32765),
        # 0-4 are the kernel's own (unspec, redirect, kernel, boot, static).
        route_proto=_int("NICHOOKS_ROUTE_PROTO", values["NICHOOKS_ROUTE_PROTO"], 5, 255),
        uplink4=_uplink("NICHOOKS_UPLINK4", values["NICHOOKS_UPLINK4"]),
        uplink6=_uplink("NICHOOKS_UPLINK6", values["NICHOOKS_UPLINK6"]),
        manage_sysctls=_flag("NICHOOKS_MANAGE_SYSCTLS", values["NICHOOKS_MANAGE_SYSCTLS"]),
        announce=_flag("NICHOOKS_ANNOUNCE", values["NICHOOKS_ANNOUNCE"]),
        iproute2_dir=Path(values["NICHOOKS_IPROUTE2_DIR"]),
        ovs_timeout=_number("NICHOOKS_OVS_TIMEOUT", values["NICHOOKS_OVS_TIMEOUT"],
                            sources["NICHOOKS_OVS_TIMEOUT"]),
        antispoof=_antispoof(values, sources),
        ovs_mtu=(_int("NICHOOKS_OVS_MTU", values["NICHOOKS_OVS_MTU"], 68, 65535)
                 if values["NICHOOKS_OVS_MTU"] else None),
        agent_interval=_number("NICHOOKS_AGENT_INTERVAL", values["NICHOOKS_AGENT_INTERVAL"],
                               sources["NICHOOKS_AGENT_INTERVAL"]),
        sources=sources,
    )
