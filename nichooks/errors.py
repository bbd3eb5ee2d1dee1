"""The two kinds of failure a hook reports, and their exit statuses.

Exit 2 is bad invocation or invalid input (nothing was changed), exit 1 is
plumbing that could not be done (and was rolled back): docs/architecture.md,
"Interfaces". Keeping the distinction in the
exception type means no caller has to guess which exit status an error deserves.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PLUMBING = 1
EXIT_INVALID = 2


class NicHooksError(Exception):
    """Base class: every expected failure is one of these, never a traceback."""

    exit_status = EXIT_PLUMBING

    def line(self) -> str:
        """The one line printed on stderr."""
        return f"nichooks: {self}"


class InvalidInput(NicHooksError):
    """A variable, argument or file that is malformed, or required and unset.

    `variable` names what was wrong (an environment variable, an argument, or
    `file:line`), so the operator can find it without reading code.
    """

    exit_status = EXIT_INVALID

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class PlumbingError(NicHooksError):
    """Well-formed input naming things that are not there or not usable."""

    exit_status = EXIT_PLUMBING

    def __init__(self, cause: str, *, nic: str = "", step: str = "") -> None:
        self.cause = cause
        self.nic = nic
        self.step = step
        super().__init__(cause)

    def __str__(self) -> str:
        parts = []
        if self.nic:
            parts.append(self.nic)
        if self.step:
            parts.append(f"step {self.step}")
        parts.append(self.cause)
        return ": ".join(parts)


class LockTimeout(PlumbingError):
    """Another hook holds the NIC for longer than we are willing to wait."""


class UntrustedPath(PlumbingError):
    """A settings file or state directory someone other than root can write: acting
    on it would let that user steer what root does."""


class NetlinkError(Exception):
    """The kernel refused a netlink request; `code` is its errno."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def cause(exc: BaseException) -> str:
    """What went wrong, in one short phrase for an error line or a journal record."""
    if isinstance(exc, NetlinkError):
        return f"{exc} (errno {exc.code})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__
