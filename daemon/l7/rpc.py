"""gRPC and Connect over HTTP/2, read without a schema: bytes of a stream in, a summary out.

A call is named by its path (`/package.Service/Method`). Its messages are length-prefixed (a flag
byte, then a 4-byte big-endian length): `Deframer` counts them and their sizes in each direction,
however the bytes are split, and keeps the first message's first bytes. Without the `.proto` the
fields have no names, but protobuf's wire format still says which bytes are length-delimited, so
`strings()` lists the printable UTF-8 values in it (nested messages walked), which is most of what
a person needs to see what was asked. A compressed message (flag 1) is counted, not read.
Never raises on input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KEEP = 1024          # bytes of the first message kept for strings()
MAX_SIZES = 16       # message sizes listed per direction


def system_of(content_type: str) -> str:
    """"grpc" or "connect" for a framed RPC content type, else ""."""
    ct = content_type.lower()
    if ct.startswith("application/grpc"):
        return "grpc"
    if ct.startswith("application/connect+"):
        return "connect"
    return ""


def name_of(path: str) -> tuple[str, str]:
    """(service, method) of an RPC path `/package.Service/Method`."""
    parts = path.partition("?")[0].strip("/").split("/")
    return (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[0] if parts else "")


@dataclass
class Deframer:
    messages: int = 0
    sizes: list[int] = field(default_factory=list)
    first: bytearray = field(default_factory=bytearray)
    compressed: bool = False
    _head: bytearray = field(default_factory=bytearray)
    _left: int = 0

    def feed(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._left == 0:
                need = 5 - len(self._head)
                self._head += data[at:at + need]
                at += need
                if len(self._head) < 5:
                    return
                n = int.from_bytes(self._head[1:5], "big")
                self.messages += 1
                if self.messages == 1:
                    self.compressed = bool(self._head[0] & 1)
                if len(self.sizes) < MAX_SIZES:
                    self.sizes.append(n)
                self._head.clear()
                self._left = n
                continue
            take = min(self._left, len(data) - at)
            if self.messages == 1 and len(self.first) < KEEP:
                self.first += data[at:at + min(take, KEEP - len(self.first))]
            self._left -= take
            at += take


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(buf) and shift < 64:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
    raise ValueError("varint runs off the end")


def _printable(chunk: bytes) -> str | None:
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text and all(c.isprintable() or c in "\n\t" for c in text) else None


def strings(message: bytes, limit: int = 16) -> list[str]:
    """Printable UTF-8 values of a protobuf message's length-delimited fields, depth first."""
    out: list[str] = []

    def walk(buf: bytes, depth: int) -> bool:
        """Appends to `out` in field order; False when `buf` is not a message (the caller drops
        what it appended: a nested guess that failed), True otherwise."""
        i = 0
        try:
            while i < len(buf):
                key, i = _varint(buf, i)
                wire, number = key & 7, key >> 3
                if number == 0:
                    return False
                if wire == 0:
                    _, i = _varint(buf, i)
                elif wire == 1:
                    i += 8
                elif wire == 5:
                    i += 4
                elif wire == 2:
                    n, i = _varint(buf, i)
                    chunk = buf[i:i + n]                # a cut message: what there is of it
                    i += n
                    text = _printable(chunk)
                    if text is not None:
                        out.append(text)
                    elif depth < 4:
                        before = len(out)
                        if not walk(chunk, depth + 1):
                            del out[before:]
                else:
                    return False
                if i > len(buf) and wire != 2:
                    return False
        except ValueError:
            return False
        return True

    walk(bytes(message), 0)      # a cut first message: the strings before the cut
    return out[:limit]


def summary(path: str, system: str, out: Deframer, back: Deframer,
            trailers: dict[str, str]) -> dict[str, str]:
    """The `http.rpc` map of one call."""
    service, method = name_of(path)
    got = {"system": system, "service": service, "method": method,
           "req_messages": str(out.messages), "resp_messages": str(back.messages),
           "req_sizes": ",".join(map(str, out.sizes)), "resp_sizes": ",".join(map(str, back.sizes))}
    for side, d in (("req", out), ("resp", back)):
        if d.compressed:
            got[f"{side}_strings"] = "(compressed)"
        elif d.first:
            got[f"{side}_strings"] = " | ".join(strings(bytes(d.first)))
    if "grpc-status" in trailers:
        got["status"] = trailers["grpc-status"]
    if trailers.get("grpc-message"):
        got["message"] = trailers["grpc-message"]
    return got
