"""Run INSIDE the agent session: a minimal WebSocket client (RFC 6455): handshake, one masked text frame
"hello", wait 3 s for the echo.  usage: rt_ws_client.py PORT"""
import base64
import os
import socket
import sys

s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
key = base64.b64encode(os.urandom(16))
s.sendall(b"GET /chat HTTP/1.1\r\nHost: ws.local\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
print("handshake:", head.split(b"\r\n")[0].decode(), flush=True)
mask = b"\x01\x02\x03\x04"            # fixed mask: no LF byte in the frame
payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"hello"))
s.sendall(b"\x81\x85" + mask + payload)
try:
    echo = s.recv(4096)
    print("ok echo", echo[2:].decode(), flush=True)
except TimeoutError:
    print("failed: no echo in 3 s (the frame never reached the server)", flush=True)
