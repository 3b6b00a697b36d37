"""The protocols the reassemble stage reads, in one table.

Each row: a name (`net.protocol`), a detector of the client's first bytes, and the maker of its
reader (daemon/streams.py `Reader`), which drives the sans-IO parser of daemon/l7/ and turns its
messages into events.  Adding a protocol is a parser in daemon/l7/, an adapter module here, and
a row below; daemon/conns.py does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agentwarden.daemon.protocols import http, postgres
from agentwarden.daemon.streams import Conn, Detected, Reader
from agentwarden.daemon.tracker import Tracker


@dataclass(frozen=True)
class L7:
    name: str
    detect: Callable[[bytes, bool], Detected]          # (first client bytes, read from mid-stream)
    reader: Callable[[Tracker, Conn], Reader]


PROTOCOLS: tuple[L7, ...] = (
    L7("postgres", postgres.detect, postgres.PostgresReader),
    L7("http", http.detect, http.HttpReader),
    L7("http2", http.detect_joined_h2, http.JoinedHttp2Reader),   # joined mid-stream: reported, not read
)
