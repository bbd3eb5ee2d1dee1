"""The write-ahead undo journal of one NIC, as data: its records and its state.

A step's undo record is in the journal on disk before the step runs, so a crash at
any point leaves a journal naming everything that might exist (docs/architecture.md,
"The journal contract"). The on-disk format and every record `kind` are a contract
with journals written by earlier versions: fields are only ever added. Where the
files live and how they are written is engine/store.py.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from nichooks.errors import InvalidInput
from nichooks.model.validate import ifname

FORMAT = 1
MAX_JOURNAL = 4 << 20  # bytes: far above any real journal, far below a runaway file
KEY = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(-[a-z0-9]{1,16})?")



class State(StrEnum):
    """Where a journal's plug stands. Stored as its string value."""

    APPLYING = "applying"        # an ifup is (or was, if it died) applying the records
    APPLIED = "applied"          # the plug is complete and verified
    UNDO_FAILED = "undo-failed"  # kept only for records whose undo failed: retried later


class Status(StrEnum):
    """A record's status. Stored as its string value."""

    PENDING = "pending"  # what it undoes may exist
    FAILED = "failed"    # its undo failed once; retried by ifdown, a sweep or the agent


class CorruptJournal(Exception):
    """A journal file that exists but is not one we wrote."""


def check_key(key: str) -> str:
    if not KEY.fullmatch(key):
        raise InvalidInput("journal key", f"{key!r} is not a NIC UUID")
    return key


@dataclass
class Record:
    """One undo record: `kind` selects the undo function, `undo` is its plain-JSON
    argument (what to delete or restore, by identity), `step` says what was done."""

    kind: str
    undo: dict[str, Any]
    step: str
    status: str = Status.PENDING
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "undo": self.undo, "step": self.step,
                               "status": self.status}
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, data: Any) -> Record:
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str) \
                or not isinstance(data.get("undo"), dict) \
                or not isinstance(data.get("error"), (str, type(None))):
            raise CorruptJournal(f"bad record {data!r:.80}")
        return cls(kind=data["kind"], undo=data["undo"], step=str(data.get("step", "")),
                   status=str(data.get("status", Status.PENDING)), error=data.get("error"))


@dataclass
class Journal:
    key: str
    tap: str
    mode: str
    instance: str
    link: str | None
    ifindex: int | None
    context: str
    state: str = State.APPLYING
    created: float = field(default_factory=time.time)
    variables: dict[str, str] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    deferred: list[dict[str, str]] = field(default_factory=list)  # see Plan.deferred
    # The ifdown scripts have run for this plug (its undo left records to retry): they
    # run once per plug, whoever tears it down (kvm-ifdown, a sweep, the agent).
    down_scripts_ran: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"deferred": self.deferred,
            "format": FORMAT, "key": self.key, "tap": self.tap, "mode": self.mode,
            "instance": self.instance, "link": self.link, "ifindex": self.ifindex,
            "context": self.context, "state": self.state, "created": self.created,
            "variables": self.variables, "records": [r.to_json() for r in self.records],
            "down_scripts_ran": self.down_scripts_ran,
        }

    @classmethod
    def from_json(cls, data: Any) -> Journal:
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise CorruptJournal("not a nichooks journal (format)")
            variables = data.get("variables", {})
            if not isinstance(variables, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in variables.items()):
                raise CorruptJournal("bad variables")
            ifindex = data.get("ifindex")
            if ifindex is not None and (not isinstance(ifindex, int) or isinstance(ifindex, bool)):
                raise CorruptJournal("bad ifindex")  # True would be looked up as ifindex 1
            link = data.get("link")
            if link is not None and not isinstance(link, str):
                raise CorruptJournal("bad link")
            records = data.get("records")
            if not isinstance(records, list):
                raise CorruptJournal("bad records")
            deferred = data.get("deferred", [])
            if not isinstance(deferred, list) or not all(
                    isinstance(d, dict) and isinstance(d.get("addr"), str)
                    and isinstance(d.get("dev"), str) for d in deferred):
                raise CorruptJournal("bad deferred entries")
            return cls(
                # The tap names files (taps/<tap>, locks/tap-<tap>.lock): a name like
                # "../../x" would reach outside the state directory.
                key=check_key(str(data["key"])), tap=ifname("journal tap", str(data["tap"])),
                mode=str(data["mode"]),
                instance=str(data.get("instance", "")), link=link,
                ifindex=ifindex, context=str(data.get("context", "")),
                state=str(data.get("state", "")), created=float(data.get("created", 0)),
                variables=variables, records=[Record.from_json(r) for r in records],
                deferred=[{"addr": d["addr"], "dev": d["dev"]} for d in deferred],
                down_scripts_ran=data.get("down_scripts_ran") is True,
            )
        except (KeyError, TypeError, ValueError, OverflowError, InvalidInput) as exc:
            raise CorruptJournal(str(exc)[:200]) from None
