"""daemon/l7/coding.py: each content coding decoded by the reference encoders (zlib, gzip, Google's
brotli, zstd), stacked codings undone in reverse, a cap on what comes out whatever goes in, and
garbage that never raises."""

from __future__ import annotations

import gzip
import json
import struct
import time
import zlib

import brotli
import pytest
from agentwarden.daemon.l7 import coding, llm
from agentwarden.daemon.protocols.http import BODY_CAP, _text_body
from hypothesis import given, settings
from hypothesis import strategies as st

zstd = coding.zstd
TEXT = json.dumps({"choices": [{"message": {"content": "x" * 300}}], "n": list(range(200))}).encode()
ENCODE = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstd.compress,
    "identity": bytes,
}


@pytest.mark.parametrize("name", sorted(ENCODE))
def test_each_coding_gives_back_the_bytes(name: str) -> None:
    assert coding.decode(name, ENCODE[name](TEXT), 1 << 20) == TEXT
    assert coding.decode(name.upper() + " ", ENCODE[name](TEXT), 1 << 20) == TEXT   # case and blanks
    assert coding.decode(name, ENCODE[name](TEXT), 100) == TEXT[:100]


def test_raw_deflate_under_the_name_deflate_is_read() -> None:
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert coding.decode("deflate", raw.compress(TEXT) + raw.flush(), 1 << 20) == TEXT


def test_stacked_codings_are_undone_last_first() -> None:
    assert coding.decode("gzip, br", brotli.compress(gzip.compress(TEXT)), 1 << 20) == TEXT
    assert coding.decode("zstd,gzip", gzip.compress(zstd.compress(TEXT)), 1 << 20) == TEXT


def flushed(name: str, chunks: list[bytes]) -> bytes:
    """A streamed reply as a server sends it: each chunk (a server-sent event) flushed on its own."""
    if name == "gzip":
        z = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
        return b"".join(z.compress(c) + z.flush(zlib.Z_SYNC_FLUSH) for c in chunks) + z.flush()
    if name == "br":
        b = brotli.Compressor()
        return b"".join(b.process(c) + b.flush() for c in chunks) + b.finish()
    zc = zstd.ZstdCompressor()
    return b"".join(zc.compress(c, zc.FLUSH_BLOCK) for c in chunks) + zc.flush()


@pytest.mark.parametrize("name", ["gzip", "br", "zstd"])
def test_a_streamed_body_cut_short_gives_the_events_before_the_cut(name: str) -> None:
    chunks = [f"data: {json.dumps({'n': i, 'text': 'y' * i})}\n\n".encode() for i in range(40)]
    sent = flushed(name, chunks)
    assert coding.decode(name, sent, 1 << 20) == b"".join(chunks)
    got = coding.decode(name, sent[: len(sent) // 2], 1 << 20)
    assert got is not None and b"".join(chunks).startswith(got) and got.count(b"\n\n") >= 10


def test_zstd_of_several_frames_is_read_whole() -> None:
    assert coding.decode("zstd", zstd.compress(TEXT) + zstd.compress(b"tail"), 1 << 20) == TEXT + b"tail"


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_a_bomb_stops_at_the_cap(name: str) -> None:
    """64 MiB of zeros sent in a few KB: at most the cap comes out, and quickly."""
    bomb = ENCODE[name](b"\0" * (64 << 20))
    assert len(bomb) < 200_000
    out = coding.decode(name, bomb, 4096)
    assert out == b"\0" * 4096


def test_a_zstd_frame_asking_for_a_window_over_8_mib_is_refused() -> None:
    """RFC 9659: the window of an HTTP zstd body is held to 8 MiB; a larger one is not allocated."""
    params = {zstd.CompressionParameter.window_log: 27, zstd.CompressionParameter.enable_long_distance_matching: 1}
    wide = zstd.compress(TEXT * 10_000, options=params)
    assert coding.decode("zstd", wide, 1 << 20) is None
    assert coding.decode("zstd", zstd.compress(TEXT * 10_000), 1 << 20) == (TEXT * 10_000)[: 1 << 20]


def test_unknown_codings_and_wrong_bytes_give_none() -> None:
    assert coding.decode("compress", b"\x1f\x9d...", 100) is None
    assert coding.decode("br", b"not brotli at all" * 10, 100) is None
    assert coding.decode("gzip", b"not gzip", 100) is None
    assert coding.decode("zstd", b"not zstd", 100) is None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ENCODE) + ["gzip, br", "zstd, deflate", "bogus", ""]), st.binary(max_size=300))
def test_garbage_never_raises(name: str, data: bytes) -> None:
    out = coding.decode(name, data, 64)
    assert out is None or len(out) <= 64


def test_an_llm_reply_in_br_or_zstd_is_read() -> None:
    req = json.dumps({"model": "gpt-z", "messages": [{"role": "user", "content": "hi"}]}).encode()
    reply = json.dumps({"model": "gpt-z-1", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "sh", "arguments": '{"cmd":"id"}'}}]}}]}).encode()
    for name in ("br", "zstd", "gzip, br"):
        headers = {"content-type": "application/json", "content-encoding": name}
        sent = brotli.compress(gzip.compress(reply)) if name == "gzip, br" else ENCODE[name](reply)
        call = llm.read_call("/v1/chat/completions", {"content-type": "application/json"}, req, headers, sent, 200)
        assert call is not None and call.complete and call.tool_calls[0].arguments == '{"cmd":"id"}', name


def test_an_http_events_text_body_is_decoded_or_not_kept() -> None:
    headers = {"content-type": "application/json", "content-encoding": "br"}
    assert _text_body(headers, brotli.compress(TEXT)) == TEXT[:BODY_CAP].decode()
    assert _text_body({**headers, "content-encoding": "compress"}, b"\x1f\x9d\x90garbage") == ""


def test_an_llm_reply_in_a_coding_not_read_is_marked_incomplete() -> None:
    req = json.dumps({"model": "gpt-z", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"content-type": "application/json", "content-encoding": "compress"}
    call = llm.read_call("/v1/chat/completions", {"content-type": "application/json"}, req, headers, b"\x1f\x9d", 200)
    assert call is not None and (call.model, call.prompt, call.complete) == ("gpt-z", "hi", False)


def test_frames_members_and_layers_are_bounded() -> None:
    """Red team: a new decoder per empty zstd frame over all the bytes left made 2 MiB take 16 s,
    and 61 gzip layers each inflated to the cap; both are bounded now (MAX_PARTS, MAX_CODINGS).
    Several gzip members are all read, as clients read them (a tool call in the second one)."""
    skippable = struct.pack("<II", 0x184D2A50, 0)
    t = time.perf_counter()
    assert coding.decode("zstd", skippable * (1 << 20), llm.BODY_CAP) == b""
    assert coding.decode("gzip", gzip.compress(b"") * (400_000), llm.BODY_CAP) == b""
    assert time.perf_counter() - t < 2.0
    layered = b"x"
    for _ in range(coding.MAX_CODINGS + 1):
        layered = gzip.compress(layered)
    assert coding.decode(", ".join(["gzip"] * (coding.MAX_CODINGS + 1)), layered, 100) is None
    assert coding.decode("gzip", gzip.compress(b"first ") + gzip.compress(b"second"), 100) == b"first second"
    assert coding.decode("gzip", b"".join(gzip.compress(b"%d," % i) for i in range(40)), 1000) == \
        b"".join(b"%d," % i for i in range(coding.MAX_PARTS))
