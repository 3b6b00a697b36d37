"""A tracked socket as the reassemble stage keeps it: per direction, the next expected byte
offset and chunks that came early; the protocol read on it, once detected."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, TypeAlias

from agentwarden.core.events import Event, NetInfo
from agentwarden.probes import net
from agentwarden.probes import process as pr


class Detected(Enum):
    """What a protocol's detector says of a connection's first client bytes."""

    YES = "yes"      # this protocol: read the connection with it
    WAIT = "wait"    # may be, once more bytes come
    NO = "no"


class Reader(Protocol):
    """A protocol's reader on one connection (daemon/protocols/): bytes of one side in order, with
    the bytes lost before them, in; contract events out.  Never raises on garbage: a desync is a
    `lost` event."""

    def feed(self, h: pr.RawHeader, client: bool, data: bytes, ts: int, gap: int) -> list[Event]: ...

    def close(self, h: pr.RawHeader, ts: int) -> list[Event]:
        """The connection ended: what was sent and never answered is still an event."""
        ...


@dataclass
class Stream:
    """One direction: the next expected offset and chunks that arrived early."""

    expected: int = 0
    early: dict[int, bytes] = field(default_factory=dict)

    def push(self, offset: int, data: bytes) -> list[tuple[int, bytes]]:
        """In-order pieces ready to parse, as (gap_before, bytes)."""
        out: list[tuple[int, bytes]] = []
        if offset < self.expected:                       # overlap with what we had
            data = data[self.expected - offset :]
            offset = self.expected
            if not data:
                return out
        if offset > self.expected and len(self.early) < 64:
            self.early[offset] = data                    # maybe a concurrent thread's chunk
            return out
        gap = offset - self.expected
        out.append((gap, data))
        self.expected = offset + len(data)
        while self.expected in self.early:
            chunk = self.early.pop(self.expected)
            out.append((0, chunk))
            self.expected += len(chunk)
        return out

    def flush_early(self) -> list[tuple[int, bytes]]:
        """Give up waiting: deliver held chunks with the gaps before them."""
        out: list[tuple[int, bytes]] = []
        for off in sorted(self.early):
            chunk = self.early.pop(off)
            if off < self.expected:
                continue
            out.append((off - self.expected, chunk))
            self.expected = off + len(chunk)
        return out


@dataclass
class Conn:
    pid: int
    fd: int
    conn_id: int
    net: NetInfo
    streams: tuple[Stream, Stream] = field(default_factory=lambda: (Stream(), Stream()))
    protocol: str | None = None        # None: not decided yet; "": not one we read
    first: bytearray = field(default_factory=bytearray)
    reader: Reader | None = None       # the detected protocol's (daemon/protocols/)
    mid_stream: bool = False
    sock_type: int = 0
    last_ts: int = 0       # events of one connection get strictly increasing timestamps

    @property
    def client(self) -> int:
        """The direction the client's bytes go: the client speaks first in the protocols we read,
        and on a socket the agent accepted the client is the peer."""
        return net.DIR_IN if self.net.direction == "accept" else net.DIR_OUT

    def stamp(self, ts_ns: int) -> int:
        """A timestamp for the next event of this connection: `ts_ns`, or just after the last
        one (events answered in one read share a clock reading; their order is kept)."""
        self.last_ts = max(ts_ns, self.last_ts + 1)
        return self.last_ts


# what a connection's events take their header from
Record: TypeAlias = net.Data | net.ConnOpen | net.ConnClose | pr.Exit
