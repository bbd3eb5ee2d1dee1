"""kvm-ifup and kvm-ifdown as Ganeti and QEMU call them: argv and the environment in,
a validated NIC (or the key of a journaled one) out to ops/, an exit status back.

Ganeti exports the NIC's variables (MODE set); Ganeti 3.2 runs one dispatcher with
ACTION=down for the teardown and passes `true`/`false` as ifdown's context; QEMU's
`script=` gives only the tap, whose NIC is then read from our spec file; Ganeti's
instance-communication taps (`gnt.com.N`) are Ganeti's own and left alone.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nichooks.errors import EXIT_INVALID, EXIT_OK, InvalidInput
from nichooks.guard import print_warnings, run_guarded
from nichooks.model import validate
from nichooks.model.nic import Nic, ganeti_only

if TYPE_CHECKING:
    from nichooks.engine.store import Store

VERBOSE_FLAGS = ("-v", "--verbose")
COMMUNICATION_PREFIX = "gnt.com."
# Ganeti's ifdown design: `true` = node-local cleanup only, `false` = hot-unplug.
GANETI_DOWN_ARGS = {"true": "shutdown", "false": "hot-unplug"}
IFUP_USAGE = "usage: kvm-ifup [-v] [TAP]   (NIC data from the environment or the spec file)"
IFDOWN_USAGE = ("usage: kvm-ifdown [-v] TAP [CONTEXT]   (CONTEXT: true, false, shutdown, "
                "migrate, migrate-failed, hot-unplug, vanished)")


def split_argv(argv: Sequence[str]) -> tuple[list[str], bool, bool]:
    """(positionals, verbose, help)."""
    positionals = [a for a in argv[1:] if a not in (*VERBOSE_FLAGS, "-h", "--help")]
    return positionals, any(a in VERBOSE_FLAGS for a in argv[1:]), \
        any(a in ("-h", "--help") for a in argv[1:])


def instance_communication(env: Mapping[str, str], positionals: Sequence[str]) -> bool:
    """Ganeti's instance-communication taps (`gnt.com.N`) are Ganeti's own: its
    kvm-ifup-os has set them up before our hook is exec'd; we must not touch them.
    Only a valid device name counts: `gnt.com./../x` is invalid input like any other
    bad name, not a reason to exit 0 without a word."""
    tap = env.get("INTERFACE") or (positionals[0] if positionals else "")
    if not tap.startswith(COMMUNICATION_PREFIX):
        return False
    try:
        validate.ifname("INTERFACE", tap)
    except InvalidInput:
        return False
    return True


# -- ifup -------------------------------------------------------------------------------
def kvm_ifup(argv: Sequence[str], env: Mapping[str, str]) -> int:
    positionals, verbose, want_help = split_argv(argv)
    if want_help:
        print(IFUP_USAGE)
        return EXIT_OK
    if env.get("ACTION") == "down":
        return kvm_ifdown([argv[0], *positionals[:1], *(["-v"] if verbose else [])], env)
    if instance_communication(env, positionals):
        return EXIT_OK

    def go() -> int:
        if not env.get("INTERFACE") and len(positionals) > 1:
            print(f"nichooks: {IFUP_USAGE}", file=sys.stderr)
            return EXIT_INVALID
        from nichooks import settings as settingsmod
        from nichooks.engine.store import Store
        from nichooks.ops.plug import ifup

        settings = settingsmod.load(env)
        Store(settings.state_dir).check()  # the spec file is read from it
        nic, ignored = nic_for_ifup(env, positionals[0] if positionals else None,
                                    settings.specs_dir)
        ifup(settings, nic, env=env, verbose=verbose, ignored=ignored)
        return EXIT_OK

    return run_guarded(go, verbose)


def nic_for_ifup(env: Mapping[str, str], tap_arg: str | None,
                 specs_dir: Path) -> tuple[Nic, list[str]]:
    """(the NIC, names a spec file set that are not Ganeti's and were ignored): from the
    environment when MODE is set (Ganeti), else from the spec file for the tap (plain
    QEMU `script=`)."""
    from nichooks.modes.registry import nic_from_variables

    if env.get("MODE"):
        return nic_from_variables(env, tap=tap_arg), []
    interface = env.get("INTERFACE")
    if interface:
        tap = validate.ifname("INTERFACE", interface)
    elif tap_arg:
        tap = validate.ifname("argument TAP", tap_arg)
    else:
        raise InvalidInput("INTERFACE", "is not set and no TAP argument was given")
    spec = specs_dir / tap
    from nichooks.callers.shellvars import read_assignments

    found = read_assignments(spec)  # a regular file only: a FIFO must not hang QEMU
    if found is None:
        raise InvalidInput("MODE", f"is not set and there is no spec file {spec}")
    variables, ignored = ganeti_only(found)
    variables["INTERFACE"] = tap  # the device is the one QEMU named, whatever the file says
    if env.get("MIGRATION_PHASE"):
        variables.setdefault("MIGRATION_PHASE", env["MIGRATION_PHASE"])
    return nic_from_variables(variables, tap=tap), [f"{spec}: {name}" for name in ignored]


# -- ifdown -----------------------------------------------------------------------------
def down_context(arg: str | None) -> str:
    from nichooks.ops.unplug import DOWN_CONTEXTS

    if arg is None or arg == "":
        return "shutdown"  # QEMU's downscript: the tap is going away with its netdev
    if arg in GANETI_DOWN_ARGS:
        return GANETI_DOWN_ARGS[arg]
    if arg in DOWN_CONTEXTS:
        return arg
    raise InvalidInput("argument CONTEXT", f"{arg!r} is not one of: "
                       + ", ".join((*GANETI_DOWN_ARGS, *DOWN_CONTEXTS)))


def kvm_ifdown(argv: Sequence[str], env: Mapping[str, str]) -> int:
    positionals, verbose, want_help = split_argv(argv)
    if want_help:
        print(IFDOWN_USAGE)
        return EXIT_OK
    if instance_communication(env, positionals):
        return EXIT_OK

    def go() -> int:
        if len(positionals) > 2:
            print(f"nichooks: {IFDOWN_USAGE}", file=sys.stderr)
            return EXIT_INVALID
        context = down_context(positionals[1] if len(positionals) > 1 else None)
        print_warnings(unplug(env, positionals[0] if positionals else None, context, verbose))
        return EXIT_OK

    return run_guarded(go, verbose)


def unplug(env: Mapping[str, str], tap_arg: str | None, context: str, verbose: bool) -> list[str]:
    """Find the NIC a teardown is about (INTERFACE or the argument names its tap;
    INTERFACE_UUID its key) and undo it."""
    from nichooks import settings as settingsmod
    from nichooks.engine.store import Store
    from nichooks.ops.unplug import ifdown

    settings = settingsmod.load(env)
    interface = env.get("INTERFACE")
    tap = validate.ifname("INTERFACE", interface) if interface else (
        validate.ifname("argument TAP", tap_arg) if tap_arg else None)
    if tap is None and not env.get("INTERFACE_UUID"):
        raise InvalidInput("TAP", "no tap given (argument or INTERFACE) and no INTERFACE_UUID")
    store = Store(settings.state_dir)
    store.check()
    key = find_key(env, tap, store, settings.ganeti_run_dir)
    return ifdown(settings, key, tap, env=env, context=context, verbose=verbose)


def find_key(env: Mapping[str, str], tap: str | None, store: Store, run_dir: Path) -> str | None:
    """The journal key of the NIC: INTERFACE_UUID, else the tap index, else the NIC
    Ganeti's runtime files name for the tap (ifdown without MODE)."""
    from nichooks.engine.journal import check_key
    raw = env.get("INTERFACE_UUID")
    if raw:
        key = validate.uuid("INTERFACE_UUID", raw)
        if store.exists(key) or not tap:
            return key
    if tap:
        owner = store.tap_owner(tap)
        if owner:
            return owner
        from nichooks.callers.ganeti_runtime import nic_env_for_tap

        found = nic_env_for_tap(run_dir, tap)
        if found and found.get("INTERFACE_UUID"):
            try:
                key = check_key(found["INTERFACE_UUID"].lower())
            except InvalidInput:
                return None
            return key if store.exists(key) else None
    return None
