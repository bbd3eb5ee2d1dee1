"""Test-only fault injection for hook processes: on PYTHONPATH of every hook a test
runs (tests.support.hooks.hook_env), inert unless NICHOOKS_TEST_FAULT is set.

NICHOOKS_TEST_FAULT=<what>:<n> wraps step n (from 1) of every plan a mode makes:
- `fail-at:n`     step n fails as if the host refused it (its record is journaled);
- `fail-after:n`  step n fails once it was applied: rollback must undo a change that
                  really happened;
- `kill-after:n`  the process is SIGKILLed right after step n;
- `drift:n`       step n's change is reverted with its own undo once every step is
                  applied (as someone else would, behind our back): its read-back fails.
Any other value does nothing. The product has no knowledge of this: the wrapper sits
between a mode's plan and the transaction that applies it.
"""

from __future__ import annotations

import os
from typing import Any


def install() -> None:
    from dataclasses import replace

    from nichooks.modes import registry

    def wrap_plan(plan_fn: Any) -> Any:
        def planned(*args: Any, **kwargs: Any) -> Any:
            plan = plan_fn(*args, **kwargs)
            what, _sep, number = os.environ.get("NICHOOKS_TEST_FAULT", "").partition(":")
            if what not in ("fail-at", "fail-after", "kill-after", "drift") \
                    or not number.isdigit() or not 1 <= int(number) <= len(plan.steps):
                return plan
            steps = list(plan.steps)
            shared: dict[str, Any] = {}
            steps[int(number) - 1] = Faulty(steps[int(number) - 1], what, shared)
            if what == "drift":
                steps[-1] = DriftAfter(steps[-1], shared)
            return replace(plan, steps=steps)

        return planned

    for mode in registry.every():
        if not getattr(mode.plan, "fault_seam", False):
            wrapped = wrap_plan(mode.plan)
            wrapped.fault_seam = True
            mode.plan = wrapped  # type: ignore[method-assign]


class Faulty:
    """A step that misbehaves as NICHOOKS_TEST_FAULT says; otherwise the step itself."""

    def __init__(self, step: Any, what: str, shared: dict[str, Any]) -> None:
        self.step, self.what, self.shared = step, what, shared

    def __getattr__(self, name: str) -> Any:
        return getattr(self.step, name)

    def prepare(self, net: Any) -> Any:
        self.shared["record"] = self.step.prepare(net)
        return self.shared["record"]

    def apply(self, net: Any) -> Any:
        if self.what == "fail-at":
            raise RuntimeError("injected fault (NICHOOKS_TEST_FAULT)")
        facts = self.step.apply(net)
        if self.what == "fail-after":
            raise RuntimeError("injected fault after the step was applied (NICHOOKS_TEST_FAULT)")
        if self.what == "kill-after":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return facts


class DriftAfter:
    """The plan's last step: once it is applied, the drifting step's change is undone."""

    def __init__(self, step: Any, shared: dict[str, Any]) -> None:
        self.step, self.shared = step, shared

    def __getattr__(self, name: str) -> Any:
        return getattr(self.step, name)

    def apply(self, net: Any) -> Any:
        facts = self.step.apply(net)
        from nichooks.engine import records

        records.undo(net, self.shared["record"])
        return facts


if os.environ.get("NICHOOKS_TEST_FAULT"):
    try:
        install()
    except ImportError:
        pass
