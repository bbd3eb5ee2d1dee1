"""One structured line per step, to syslog (journald reads /dev/log too).

The fields (instance, NIC UUID, tap, context) are on every line so an operator can
follow one NIC across nodes with a single grep. Without a syslog socket the libc
call drops the message silently, which is what a hook needs: the only thing a
caller ever sees on stderr is the one error line (or everything, with -v).
"""

from __future__ import annotations

import sys
from typing import Any


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\\\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class HookLog:
    def __init__(self, *, verbose: bool = False, **fields: Any) -> None:
        self.verbose = verbose
        self.fields: dict[str, Any] = dict(fields)
        self._opened = False

    def bind(self, **fields: Any) -> None:
        self.fields.update({k: v for k, v in fields.items() if v is not None})

    def _emit(self, priority: int, event: str, kv: dict[str, Any]) -> None:
        import syslog

        if not self._opened:
            syslog.openlog("nichooks", syslog.LOG_PID, syslog.LOG_DAEMON)
            self._opened = True
        items = {**self.fields, "event": event, **kv}
        line = " ".join(f"{k}={_quote(v)}" for k, v in items.items())
        syslog.syslog(priority, line)
        if self.verbose:
            print(f"nichooks[{event}]: {line}", file=sys.stderr, flush=True)

    def info(self, event: str, **kv: Any) -> None:
        import syslog

        self._emit(syslog.LOG_INFO, event, kv)

    def warning(self, event: str, **kv: Any) -> None:
        import syslog

        self._emit(syslog.LOG_WARNING, event, kv)

    def error(self, event: str, **kv: Any) -> None:
        import syslog

        self._emit(syslog.LOG_ERR, event, kv)
