"""The thin entry points behind bin/: argv in, exit status out. Each caller's own
conventions live in callers/; this module only picks the process environment."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


def kvm_ifup(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    from nichooks.callers.ganeti import kvm_ifup as run

    return run(argv, os.environ if env is None else env)


def kvm_ifdown(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    from nichooks.callers.ganeti import kvm_ifdown as run

    return run(argv, os.environ if env is None else env)


def vif_ganeti(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    from nichooks.callers.xen_vif import run

    return run(argv, env)
