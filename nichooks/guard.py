"""How every entry point ends: one `nichooks: ...` line and an exit status.

Every expected failure becomes one line and exit 1 or 2; anything unexpected becomes
one line and exit 1 as well (the traceback only with -v or NICHOOKS_DEBUG=1), because
Ganeti shows a hook's output only on failure, verbatim.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from nichooks.errors import EXIT_PLUMBING, NicHooksError

# What str.splitlines() (and so a caller reading our stderr by lines) breaks a line on,
# and every other control character but tab, as visible escapes.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c != 0x09}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x85: "\\x85", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def single_line(text: str) -> str:
    """`text` with every line break and control character escaped.

    An error or warning line is one line, whatever went into it: causes and step names
    can carry text that came from a journal, xenstore, a kernel or OVSDB message, and a
    newline there would forge a second `nichooks:` line."""
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
