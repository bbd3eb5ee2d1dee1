"""One JSON-RPC request to ovsdb-server, on a fresh plain socket.

The `ovs` package's JSON parser is pure Python and slow on big replies (~15 ms on
the schema alone), and its IDL exists to keep a replica, which a one-off read does
not need. The stdlib's C parser on a plain socket answers both the IDL's first
question (the schema) and a sweep's whole-switch reads in one round trip each. It
is also where a remote we cannot reach becomes an OvsdbError, for every caller.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any


class OvsdbError(Exception):
    """OVSDB unreachable, too slow, or a transaction refused; the message says which."""


def fetch_schema(remote: str, deadline: float) -> Any:
    """The server's Open_vSwitch schema, over a plain socket with the stdlib's C JSON
    parser (the `ovs` package's pure-Python parser takes ~15 ms on it)."""
    return request(remote, "get_schema", ["Open_vSwitch"], deadline)


def request(remote: str, method: str, params: list[Any], deadline: float) -> Any:
    """One JSON-RPC request on a fresh connection; its result or OvsdbError."""
    kind, _, where = remote.partition(":")
    try:
        if kind == "unix":
            if not os.path.exists(where):
                raise OvsdbError(f"OVSDB socket {where} does not exist (is ovsdb-server running?)")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = where
        elif kind == "tcp":
            host, _, port = where.rpartition(":")
            sock = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
            address = (host.strip("[]"), int(port))
        else:
            raise OvsdbError(f"NICHOOKS_OVSDB {remote!r}: only unix: and tcp: remotes are supported")
        with sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(address)
            sock.sendall(json.dumps({"method": method, "params": params, "id": 0}).encode())
            buffer = b""
            decoder = json.JSONDecoder()
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    raise OvsdbError(f"{remote} closed the connection")
                buffer += chunk
                try:
                    reply, _ = decoder.raw_decode(buffer.decode())
                except (ValueError, UnicodeDecodeError):
                    continue
                if reply.get("error"):
                    raise OvsdbError(f"{remote}: {method} failed: {reply['error']}")
                if method == "transact":
                    for op in reply.get("result") or []:
                        if isinstance(op, dict) and op.get("error"):
                            raise OvsdbError(f"{remote}: {method} failed: {op['error']}")
                return reply["result"]
    except TimeoutError:
        raise OvsdbError(f"no answer from the OVSDB at {remote} within the timeout") from None
    except OSError as exc:
        raise OvsdbError(f"cannot reach the OVSDB at {remote}: {exc.strerror or exc}") from None
