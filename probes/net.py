"""Decode the records of net.bpf.c: connection lifecycle and payload chunks."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple

from agentwarden.probes.process import HDR, DecodeError, Hdr, RawHeader, header, header_at

EV_CONNECT = 20
EV_ACCEPT = 21
EV_CLOSE = 22
EV_DATA = 23
EV_SEEN = 25     # a socket first seen moving bytes (accepted, inherited, passed, older than tracking)
SEEN_ACCEPTED = 1
SEEN_MIDSTREAM = 2

DIR_OUT = 0   # the tracked process sent these bytes
DIR_IN = 1    # the tracked process received them
DATA_TLS = 1  # Data.flags: plaintext from the OpenSSL uprobes

SOCKADDR_LEN = 128
SOCK_STREAM = 1
SOCK_DGRAM = 2


class ConnRec(ct.Structure):
    _fields_ = [
        ("h", Hdr),
        ("conn_id", ct.c_uint64),
        ("fd", ct.c_int32),
        ("ret", ct.c_int32),
        ("type", ct.c_uint32),
        ("addr_len", ct.c_uint32),
        ("addr", ct.c_uint8 * SOCKADDR_LEN),
    ]


class DataHead(ct.Structure):
    _fields_ = [
        ("h", Hdr),
        ("conn_id", ct.c_uint64),
        ("offset", ct.c_uint64),
        ("fd", ct.c_int32),
        ("len", ct.c_uint32),
        ("total", ct.c_uint32),
        ("dir", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("_pad", ct.c_uint8 * 2),
    ]


# DataHead after its Hdr, as one struct.unpack (sizes checked equal at import)
DATA_TAIL = struct.Struct("<QQiIIBB2x")
DATA_SIZE = HDR.size + DATA_TAIL.size


class ConnKey(ct.Structure):
    _fields_ = [("key", ct.c_uint64)]


class ConnVal(ct.Structure):
    _fields_ = [("id", ct.c_uint64), ("off", ct.c_uint64 * 2), ("type", ct.c_uint32), ("tls", ct.c_uint32),
                ("ptoff", ct.c_uint64 * 2), ("sk", ct.c_uint64), ("ino", ct.c_uint64)]


@dataclass(frozen=True)
class Peer:
    """Where a socket points: transport plus ip:port or a Unix path."""

    family: str          # "inet", "inet6", "unix", ""
    ip: str = ""
    port: int = 0
    path: str = ""


def parse_sockaddr(raw: bytes) -> Peer:
    if len(raw) < 2:
        return Peer("")
    family = int.from_bytes(raw[:2], "little")
    if family == socket.AF_INET and len(raw) >= 8:
        return Peer("inet", str(ipaddress.IPv4Address(raw[4:8])), int.from_bytes(raw[2:4], "big"))
    if family == socket.AF_INET6 and len(raw) >= 24:
        ip = ipaddress.IPv6Address(raw[8:24])
        text = str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)
        return Peer("inet6", text, int.from_bytes(raw[2:4], "big"))
    if family == socket.AF_UNIX:
        path = raw[2:]
        if path[:1] == b"\0":      # abstract socket
            return Peer("unix", path="@" + path[1:].split(b"\0", 1)[0].decode(errors="replace"))
        return Peer("unix", path=path.split(b"\0", 1)[0].decode(errors="replace"))
    return Peer("")


@dataclass(frozen=True)
class ConnOpen:
    """A connect (as the kernel is asked to make it), or a socket first seen moving bytes."""

    h: RawHeader
    conn_id: int
    fd: int
    accepted: bool
    sock_type: int
    peer: Peer
    mid_stream: bool = False   # bytes moved on it before its first record


@dataclass(frozen=True)
class ConnClose:
    h: RawHeader
    conn_id: int
    fd: int


class Data(NamedTuple):
    """Payload bytes of one direction of a connection (a named tuple: the hottest record)."""

    h: RawHeader
    conn_id: int
    fd: int
    direction: int
    offset: int
    total: int
    data: bytes
    tls: bool = False      # plaintext from the OpenSSL uprobes


NetEvent = ConnOpen | ConnClose | Data


def decode(kind: int, buf: bytes) -> NetEvent:
    if kind in (EV_CONNECT, EV_ACCEPT, EV_CLOSE, EV_SEEN):
        if len(buf) < ct.sizeof(ConnRec):
            raise DecodeError(f"record type {kind}: {len(buf)} bytes, need {ct.sizeof(ConnRec)}")
        c = ConnRec.from_buffer_copy(buf[: ct.sizeof(ConnRec)])
        if kind == EV_CLOSE:
            return ConnClose(header(c.h), c.conn_id, c.fd)
        addr = bytes(c.addr)[: min(c.addr_len, SOCKADDR_LEN)]
        if kind == EV_SEEN:
            return ConnOpen(header(c.h), c.conn_id, c.fd, bool(c.ret & SEEN_ACCEPTED), c.type,
                            parse_sockaddr(addr), bool(c.ret & SEEN_MIDSTREAM))
        fd = c.ret if kind == EV_ACCEPT else c.fd
        return ConnOpen(header(c.h), c.conn_id, fd, kind == EV_ACCEPT, c.type, parse_sockaddr(addr))
    if kind == EV_DATA:
        size = DATA_SIZE
        if len(buf) < size:
            raise DecodeError(f"data record of {len(buf)} bytes")
        conn_id, offset, fd, length, total, direction, flags = DATA_TAIL.unpack_from(buf, HDR.size)
        if size + length > len(buf):
            raise DecodeError(f"data record claims {length} bytes, has {len(buf) - size}")
        return Data(header_at(buf), conn_id, fd, direction & 1, offset, total, buf[size : size + length],
                    bool(flags & DATA_TLS))
    raise DecodeError(f"unknown record type {kind}")


KINDS = (EV_CONNECT, EV_ACCEPT, EV_CLOSE, EV_DATA, EV_SEEN)


assert ct.sizeof(DataHead) == DATA_SIZE, "probes/net.py: DATA_TAIL and DataHead disagree"
