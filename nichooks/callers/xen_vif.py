"""`vif-ganeti`: the Xen vif script, called by libxl as
`vif-ganeti online|offline type_if=vif` for the PV vif and
`vif-ganeti add|remove type_if=tap` for an HVM NIC's emulated tap (`INTERFACE` set).

It follows Xen's own `vif-common.sh` conventions: a command that is not for this
device type exits 0; `online` honours xenstore `vifname` by renaming the vif first;
success on `online` of a vif writes `hotplug-status connected`; any failure writes
`hotplug-error` and `hotplug-status error` (libxl reports those) and exits non-zero.
The NIC itself comes from Ganeti's Xen NIC file, or, where Ganeti did not write one
(a migration target, #944), from what xenstore holds for the vif.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from nichooks.errors import EXIT_OK, InvalidInput, NicHooksError
from nichooks.log import HookLog

if TYPE_CHECKING:
    from nichooks.callers.xen import XenStore

COMMANDS = {"online": "vif", "offline": "vif", "add": "tap", "remove": "tap"}
USAGE = "usage: vif-ganeti online|offline|add|remove [type_if=vif|tap]"
EMU = "emu"  # the HVM tap's device suffix (its name is vif<domid>.<devid>-emu)


def _arguments(argv: Sequence[str]) -> tuple[str, str]:
    """(command, type_if); Xen passes extra key=value words, of which only type_if matters."""
    words = [a for a in argv[1:] if a not in ("-v", "--verbose")]
    if not words or words[0] not in COMMANDS:
        raise InvalidInput("command", f"{words[0] if words else ''!r} is not one of: "
                           + ", ".join(COMMANDS))
    type_if = "vif"
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if sep and key == "type_if":
            if value not in ("vif", "tap"):
                raise InvalidInput("type_if", f"{value!r} is not vif or tap")
            type_if = value
    return words[0], type_if


_XENSTORE_PATH = re.compile(r"/?[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*",
                            re.ASCII)


def backend_path(env: Mapping[str, str]) -> str:
    """XENBUS_PATH (libxl: `backend/vif/<domid>/<devid>`), or "" when unset.

    It is handed to xenstore-read and xenstore-write as an argument and keys become
    `<it>/hotplug-status`: a value that is not a plain xenstore path (an option-like
    `-x`, `..`, empty components, spaces, control characters) is refused rather than
    written to."""
    raw = env.get("XENBUS_PATH", "")
    if raw and (len(raw) > 512 or not _XENSTORE_PATH.fullmatch(raw)
                or any(part in (".", "..") for part in raw.split("/"))):
        raise InvalidInput("XENBUS_PATH", f"{raw[:80]!r} is not a xenstore path "
                           "(backend/vif/<domid>/<devid>)")
    return raw


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    from nichooks.guard import run_guarded, single_line

    env = dict(os.environ if env is None else env)
    verbose = any(a in ("-v", "--verbose") for a in argv[1:])
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(USAGE)
        return EXIT_OK
    try:
        backend = backend_path(env)
    except InvalidInput:
        backend = ""  # nowhere to report the failure to; _dispatch raises it again

    def go() -> int:
        try:
            return _dispatch(argv, env, verbose)
        except NicHooksError as exc:
            _report_failure(env, backend, single_line(exc.line()))
            raise

    return run_guarded(go, verbose)


def _report_failure(env: Mapping[str, str], backend: str, line: str) -> None:
    """What Xen's `fatal` does, so `xl` shows the reason. Best effort: a broken
    xenstore must not hide the original error."""
    if not backend:
        return
    from nichooks.callers.xen import XenStore

    try:
        XenStore(env).write((f"{backend}/hotplug-error", line.removeprefix("nichooks: ")),
                            (f"{backend}/hotplug-status", "error"))
    except NicHooksError:
        pass


def _dispatch(argv: Sequence[str], env: dict[str, str], verbose: bool) -> int:
    from dataclasses import replace

    from nichooks import settings as settingsmod
    from nichooks.callers import xen
    from nichooks.callers.ganeti import unplug
    from nichooks.engine.store import Store
    from nichooks.guard import print_warnings
    from nichooks.model import nic as nicmod
    from nichooks.modes.registry import nic_from_variables
    from nichooks.ops.plug import ifup

    command, type_if = _arguments(argv)
    if COMMANDS[command] != type_if:
        return EXIT_OK  # vif-common.sh: online/offline are for vifs, add/remove for taps
    vif = env.get("vif", "")
    if not vif:
        raise InvalidInput("vif", "is not set (libxl sets it for vif scripts)")
    domid, devid = xen.parse_vif(vif)
    backend = backend_path(env)
    settings = settingsmod.load(env)
    log = HookLog(verbose=verbose or settings.debug, tap=vif, context=command)
    store = xen.XenStore(env)
    if type_if == "tap":
        dev = env.get("INTERFACE") or f"{vif}-emu"
    else:
        dev = _rename_to_vifname(store, backend, vif, log) if command == "online" else \
            _current_name(store, backend, vif)

    if command in ("offline", "remove"):
        print_warnings(unplug({**env, "INTERFACE": dev}, dev, "shutdown", verbose))
        return EXIT_OK

    instance, incoming = xen.domain_name(domid, env)
    path = xen.nic_file(settings.ganeti_run_dir, instance, devid)
    found = xen.read_nic_file(path)
    variables: dict[str, str] | None = None
    if found is not None:
        # Ganeti writes INTERFACE_NAME unquoted: a tenant's NIC name can append
        # assignments of its own. Only Ganeti's names describe the NIC; settings and
        # the scripts' environment come from libxl's environment alone.
        variables, ignored = nicmod.ganeti_only(found)
        for name in ignored:
            log.warning("xen", file=path, ignored=name, result="not a Ganeti NIC variable")
        if not variables.get("MODE"):
            # Ganeti always writes MODE; without it ifup would look for a QEMU spec
            # file and blame that instead of the file that is wrong.
            raise InvalidInput(str(path), "sets no MODE (not a NIC file Ganeti wrote)")
    if variables is None:
        variables = xen.from_xenstore(store, backend)
        log.warning("xen", instance=instance, result="no NIC file",
                    source="xenstore", mode=variables.get("MODE"), link=variables.get("LINK"))
    variables.update(INSTANCE=instance, INTERFACE=dev)
    variables.setdefault("INTERFACE_INDEX", str(devid))
    if incoming:
        variables.setdefault("MIGRATION_PHASE", "pre")
    Store(settings.state_dir).check()  # before the NIC is validated, as for kvm-ifup
    nic = nic_from_variables(variables, tap=dev)
    if type_if == "tap":
        nic = replace(nic, device=EMU)  # its own journal key: neither plug undoes the other
    ifup(settings, nic, env=env, context="migrate" if incoming else None, verbose=verbose)
    if type_if == "vif" and backend:
        store.write((f"{backend}/hotplug-status", "connected"))
    return EXIT_OK


def _current_name(store: XenStore, backend: str, vif: str) -> str:
    """On offline the device may carry its xenstore `vifname` already."""
    if os.path.exists(f"/sys/class/net/{vif}") or not backend:
        return vif
    vifname = store.read(f"{backend}/vifname")
    return vifname or vif


def _rename_to_vifname(store: XenStore, backend: str, vif: str, log: HookLog) -> str:
    """Xen's vif-common: with xenstore `vifname` set, the vif is renamed (down first)
    before anything else, and everything after uses the new name."""
    from nichooks.host.netlink import Netlink
    from nichooks.model import validate

    vifname = store.read(f"{backend}/vifname") if backend else None
    if not vifname or vifname == vif:
        return vif
    vifname = validate.ifname("vifname", vifname)
    net = Netlink()
    try:
        state = net.find(vif)
        if state is None:
            if net.find(vifname) is not None:
                return vifname  # renamed by an earlier run
            return vif  # ifup will say the device does not exist
        if state.up:
            net.set_link(state.index, state="down")
        net.set_link(state.index, ifname=vifname)
        log.info("xen", step=f"rename {vif} to {vifname}", result="ok")
    finally:
        net.close()
    return vifname
