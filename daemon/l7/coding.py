"""HTTP content codings (RFC 9110 section 8.4): a body as it was sent, back to the bytes it
encodes, never more than a cap out.

gzip, deflate, br and zstd: the codings a client names in `Accept-Encoding`.  Node's fetch
(undici) asks HTTPS servers for `br` first, curl `--compressed` and Python clients with brotli
or zstd installed ask for those too, and API fronts answer with them: before this module an LLM
call's reply in `br` was unreadable (no tool calls, no cause for the command they asked for).

Every decoder stops at `cap` bytes out: a few KB in can be a GB out (red team: 200 KB of gzip
was 200 MB).  zstd's window is held to 8 MiB, the limit RFC 9659 sets for HTTP (a frame may
otherwise ask the decoder for up to 2 GiB of window memory before the first byte out).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli

try:   # Python 3.14's standard library; the same module backported before it
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

ZSTD_WINDOW_LOG_MAX = 23   # 8 MiB (RFC 9659 section 3)
MAX_CODINGS = 4            # codings stacked on one body; past them it is not read (red team: 61
                           # gzip layers, each inflated to the cap, took 1.4 s of the daemon's thread)
MAX_PARTS = 16             # gzip members or zstd frames read in one body; past them the rest is cut
                           # (red team: a new decoder per empty zstd frame over the bytes left made a
                           # 2 MiB body take 16 s)


def decode(content_encoding: str, body: bytes, cap: int) -> bytes | None:
    """The bytes `body` encodes under `content_encoding` (the header's value, codings in the
    order they were applied), at most `cap` of them; a truncated body gives what its first
    bytes decode to.  None for a coding this module does not know or bytes that are not what
    the header says."""
    out = body
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    if len(codings) > MAX_CODINGS:
        return None
    for coding in reversed(codings):
        step = _DECODERS.get(coding)
        if step is None:
            return None
        try:
            out = step(out, cap)[:cap]
        except (zlib.error, brotli.error, zstd.ZstdError, MemoryError, ValueError):
            return None
    return out[:cap]


def _zlib(wbits: int) -> Callable[[bytes, int], bytes]:
    def step(body: bytes, cap: int) -> bytes:
        """Every member (a gzip stream may be several, and clients read them all: red team, a
        tool call in the second member), to the cap; no flush(): it would inflate all that is
        left, whatever its size."""
        out = bytearray()
        rest = memoryview(body)
        for _ in range(MAX_PARTS):
            d = zlib.decompressobj(wbits)
            out += d.decompress(rest, cap - len(out))
            if not d.eof or not d.unused_data or len(out) >= cap:
                break
            rest = rest[len(rest) - len(d.unused_data):]
        return bytes(out)
    return step


def _deflate(body: bytes, cap: int) -> bytes:
    """`deflate` is zlib's format (RFC 9110 8.4.1.2); some servers send raw deflate under the name."""
    try:
        return _zlib(zlib.MAX_WBITS)(body, cap)
    except zlib.error:
        return _zlib(-zlib.MAX_WBITS)(body, cap)


def _gzip(body: bytes, cap: int) -> bytes:
    return _zlib(zlib.MAX_WBITS | 32)(body, cap)   # gzip's header, or zlib's (a server's mislabel)


def _br(body: bytes, cap: int) -> bytes:
    out: bytes = brotli.Decompressor().process(body, output_buffer_limit=cap)
    return out


def _zstd(body: bytes, cap: int) -> bytes:
    """Every frame of the body (a stream may be several), to the cap."""
    out = bytearray()
    rest = memoryview(body)
    for _ in range(MAX_PARTS):
        if not rest or len(out) >= cap:
            break
        d = zstd.ZstdDecompressor(options={zstd.DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG_MAX})
        out += d.decompress(rest, cap - len(out))
        if not d.eof:
            break
        rest = rest[len(rest) - len(d.unused_data):]
    return bytes(out)


_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "identity": lambda body, cap: body,
    "gzip": _gzip, "x-gzip": _gzip,
    "deflate": _deflate,
    "br": _br,
    "zstd": _zstd,
}
