"""Raw HTTP client run INSIDE the agent session: each HEX arg is one send() (TCP_NODELAY, 0.15 s apart).
usage: rt_client.py HOST PORT [--tls] HEX [HEX ...]; prints `ok <status lines>` or `failed <why>`."""
import socket
import ssl
import sys
import time

args = sys.argv[1:]
tls = "--tls" in args
args = [a for a in args if a != "--tls"]
host, port, *hexes = args
try:
    s = socket.create_connection((host, int(port)), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s = ctx.wrap_socket(s)
    for h in hexes:
        s.sendall(bytes.fromhex(h))
        time.sleep(0.15)
    s.settimeout(1.5)
    got = b""
    try:
        while True:
            more = s.recv(65536)
            if not more:
                break
            got += more
    except TimeoutError:
        pass
    lines = [ln.decode() for ln in got.split(b"\r\n") if ln.startswith(b"HTTP/")]
    print("ok " + " | ".join(lines) if got else "failed the connection ended", flush=True)
except OSError as e:
    print(f"failed {e!r}", flush=True)
