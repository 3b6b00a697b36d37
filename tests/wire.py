"""A client that sends protocol bytes cut where the caller says: the agent that splits its
messages across sends to get past a matcher that reads one send at a time.

    python3 wire.py pg HOST PORT DB [--tls] [--startup-split N] HEX [HEX ...]
    python3 wire.py http HOST PORT [--tls] HEX [HEX ...]

Each HEX is one send (one `send()` on TCP, one `SSL_write` over TLS), in order, with TCP_NODELAY
and a short pause between them, so that each reaches the kernel as its own message.  For `pg`
the client first starts a session as `postgres` (trust authentication), its StartupMessage cut
after N bytes when asked.  It then reads what the server answers until the server is ready again
or the connection ends, and prints one line: `ok`, `error <server message>`, or `failed <why>`.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
import time


def _connect(host: str, port: int, tls: bool, pg: bool) -> socket.socket:
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not tls:
        return s
    if pg:   # SSLRequest; the server answers 'S'
        s.sendall(struct.pack("!ii", 8, 80877103))
        if s.recv(1) != b"S":
            raise OSError("the server refused TLS")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(s)


def _send(s: socket.socket, chunks: list[bytes]) -> None:
    for chunk in chunks:
        s.sendall(chunk)
        time.sleep(0.05)


def readies(data: bytes) -> int:
    """How many ReadyForQuery the server owes for these messages (one per Query and Sync)."""
    n, off = 0, 0
    while off + 5 <= len(data):
        n += data[off:off + 1] in (b"Q", b"S")
        off += 1 + struct.unpack("!i", data[off + 1:off + 5])[0]
    return n


def pg_answers(s: socket.socket, readies: int = 1) -> str:
    """Read messages until the server was ready `readies` times; the first error's message, else ok."""
    buf, error = b"", ""
    while readies:
        while len(buf) < 5 or len(buf) < 1 + struct.unpack("!i", buf[1:5])[0]:
            more = s.recv(65536)
            if not more:
                return f"failed the connection ended{' after ' + error if error else ''}"
            buf += more
        kind, n = buf[:1], struct.unpack("!i", buf[1:5])[0]
        body, buf = buf[5:1 + n], buf[1 + n:]
        if kind == b"E" and not error:
            fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
            error = fields.get(b"M", b"?").decode()
        readies -= kind == b"Z"
    return f"error {error}" if error else "ok"


def pg(host: str, port: int, db: str, tls: bool, split: int, chunks: list[bytes]) -> str:
    s = _connect(host, port, tls, True)
    params = b"user\0postgres\0database\0" + db.encode() + b"\0\0"
    startup = struct.pack("!ii", 8 + len(params), 0x00030000) + params
    _send(s, [startup[:split], startup[split:]] if split else [startup])
    first = pg_answers(s)
    if first != "ok":
        return f"failed startup: {first}"
    _send(s, chunks)
    return pg_answers(s, readies(b"".join(chunks)))


def http(host: str, port: int, tls: bool, chunks: list[bytes]) -> str:
    s = _connect(host, port, tls, False)
    _send(s, chunks)
    answer = s.recv(65536)
    return "ok " + answer.split(b"\r\n", 1)[0].decode() if answer else "failed the connection ended"


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    tls = "--tls" in args
    args = [a for a in args if a != "--tls"]
    split = 0
    if "--startup-split" in args:
        i = args.index("--startup-split")
        split = int(args[i + 1])
        del args[i:i + 2]
    try:
        if mode == "pg":
            host, port, db, *hexes = args
            out = pg(host, int(port), db, tls, split, [bytes.fromhex(h) for h in hexes])
        else:
            host, port, *hexes = args
            out = http(host, int(port), tls, [bytes.fromhex(h) for h in hexes])
    except OSError as e:
        out = f"failed {e}"
    print(out, flush=True)
    return 0 if out.startswith("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
