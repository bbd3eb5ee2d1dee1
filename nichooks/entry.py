"""The thin entry points behind bin/: argv in, exit status out.

Every expected failure becomes one `nichooks: ...` line and exit 1 or 2; anything
unexpected becomes one line and exit 1 as well (the traceback only with -v or
NICHOOKS_DEBUG=1), because Ganeti shows a hook's output only on failure, verbatim.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence

from nichooks.errors import EXIT_INVALID, EXIT_OK, EXIT_PLUMBING, NicHooksError

VERBOSE_FLAGS = ("-v", "--verbose")


def _split(argv: Sequence[str]) -> tuple[list[str], bool, bool]:
    """(positionals, verbose, help)."""
    positionals = [a for a in argv[1:] if a not in (*VERBOSE_FLAGS, "-h", "--help")]
    return positionals, any(a in VERBOSE_FLAGS for a in argv[1:]), \
        any(a in ("-h", "--help") for a in argv[1:])


# What str.splitlines() (and so a caller reading our stderr by lines) breaks a line on,
# and every other control character but tab, as visible escapes.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c != 0x09}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x85: "\\x85", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def single_line(text: str) -> str:
    """`text` with every line break and control character escaped.

    An error or warning line is one line (DESIGN §4), whatever went into it: causes
    and step names can carry text that came from a journal, xenstore, a kernel or
    OVSDB message, and a newline there would forge a second `nichooks:` line."""
    return text.translate(_ESCAPES)


def print_warnings(lines: Sequence[str]) -> None:
    """ifdown's "could not undo" lines, one `nichooks: warning:` line each."""
    for line in lines:
        print(single_line(f"nichooks: warning: {line}"), file=sys.stderr)


def run_guarded(fn: Callable[[], int], verbose: bool) -> int:
    try:
        return fn()
    except NicHooksError as exc:
        print(single_line(exc.line()), file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("nichooks: interrupted", file=sys.stderr)
        return EXIT_PLUMBING
    except Exception as exc:  # an unexpected failure still gets one line, not a traceback
        if verbose or os.environ.get("NICHOOKS_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        print(single_line(f"nichooks: internal error: {type(exc).__name__}: {exc}"), file=sys.stderr)
        return EXIT_PLUMBING


COMMUNICATION_PREFIX = "gnt.com."


def _instance_communication(env: Mapping[str, str], positionals: Sequence[str]) -> bool:
    """Ganeti's instance-communication taps (`gnt.com.N`) are Ganeti's own: its
    kvm-ifup-os has set them up before our hook is exec'd; we must not touch them.
    Only a valid device name counts: `gnt.com./../x` is invalid input like any other
    bad name, not a reason to exit 0 without a word."""
    from nichooks.errors import InvalidInput
    from nichooks.model.validate import ifname

    tap = env.get("INTERFACE") or (positionals[0] if positionals else "")
    if not tap.startswith(COMMUNICATION_PREFIX):
        return False
    try:
        ifname("INTERFACE", tap)
    except InvalidInput:
        return False
    return True


IFUP_USAGE = "usage: kvm-ifup [-v] [TAP]   (NIC data from the environment or the spec file)"
IFDOWN_USAGE = ("usage: kvm-ifdown [-v] TAP [CONTEXT]   (CONTEXT: true, false, shutdown, "
                "migrate, migrate-failed, hot-unplug, vanished)")


def kvm_ifup(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    positionals, verbose, want_help = _split(argv)
    if want_help:
        print(IFUP_USAGE)
        return EXIT_OK
    if env.get("ACTION") == "down":
        # Ganeti 3.2 runs one dispatcher with ACTION=down for the teardown.
        return kvm_ifdown([argv[0], *positionals[:1], *(["-v"] if verbose else [])], env)

    if _instance_communication(env, positionals):
        return EXIT_OK

    def go() -> int:
        from nichooks.ops.plug import Request, ifup

        if not env.get("INTERFACE") and len(positionals) > 1:
            print(f"nichooks: {IFUP_USAGE}", file=sys.stderr)
            return EXIT_INVALID
        ifup(Request(env=env, tap=positionals[0] if positionals else None, verbose=verbose))
        return EXIT_OK

    return run_guarded(go, verbose)


def kvm_ifdown(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    positionals, verbose, want_help = _split(argv)
    if want_help:
        print(IFDOWN_USAGE)
        return EXIT_OK

    if _instance_communication(env, positionals):
        return EXIT_OK

    def go() -> int:
        from nichooks.ops.plug import Request, down_context, ifdown

        if len(positionals) > 2:
            print(f"nichooks: {IFDOWN_USAGE}", file=sys.stderr)
            return EXIT_INVALID
        context = down_context(positionals[1] if len(positionals) > 1 else None)
        tap = positionals[0] if positionals else None
        print_warnings(ifdown(Request(env=env, tap=tap, context=context, verbose=verbose)))
        return EXIT_OK

    return run_guarded(go, verbose)


def vif_ganeti(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    from nichooks.callers.xen_vif import run

    return run(argv, env)
