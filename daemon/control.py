"""Control socket: newline-delimited JSON over a Unix stream socket.

Callers are authenticated by the kernel (SO_PEERCRED), never by anything they
say: root, or a member of the control group, may read.  Operations marked
`privileged` are refused to any process inside an agent session, even root,
so an agent cannot act on its own audit or approvals.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024


class ControlError(RuntimeError):
    pass


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: set[int] = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return Peer(pid, uid, gid, frozenset(groups))


@dataclass
class Call:
    """One request: who sent it, what it asks, and how to answer (streaming ops write lines)."""

    peer: Peer
    args: dict[str, Any]
    write: Callable[[dict[str, Any]], None]
    sock: socket.socket


@dataclass
class Operation:
    """fn returns the reply, or None after streaming its own lines through call.write."""

    fn: Callable[[Call], dict[str, Any] | None]
    privileged: bool = False
    # any local user may call it (the operation authorises the person itself):
    # the launcher of an agent approves its own held commands without joining the group
    public: bool = False


class ControlServer:
    def __init__(self, path: str, group: str, ops: dict[str, Operation],
                 in_agent_session: Callable[[int], bool]) -> None:
        self.path = path
        self.group = group
        self.ops = ops
        self.in_agent_session = in_agent_session
        self._gid: int | None = None
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    def authorize(self, peer: Peer, op: Operation) -> str | None:
        """None when allowed, else the reason for the refusal."""
        if not op.public and peer.uid != 0 and (self._gid is None or self._gid not in peer.groups):
            return f"uid {peer.uid} is neither root nor in group {self.group!r}"
        if op.privileged and self.in_agent_session(peer.pid):
            return f"pid {peer.pid} runs inside an agent session"
        return None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        try:
            self._gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            log.warning("group %r does not exist: only root can use %s", self.group, self.path)
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                server._handle(self.request, self.rfile, self.wfile)

        # bind with a tight umask, so the socket is never briefly world-connectable
        old = os.umask(0o117)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        os.chown(self.path, 0, self._gid if self._gid is not None else 0)
        # connectable by everyone when some operation is public; SO_PEERCRED decides per operation
        os.chmod(self.path, 0o666 if any(op.public for op in self.ops.values()) else 0o660)
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)
        self._thread.start()
        log.info("control socket %s ready", self.path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _handle(self, sock: socket.socket, rfile: Any, wfile: Any) -> None:
        lock = threading.Lock()

        def write(obj: dict[str, Any]) -> None:
            data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()
            with lock:
                wfile.write(data)
                wfile.flush()

        try:
            peer = peer_of(sock)
            line = rfile.readline(MAX_REQUEST)
            if not line:
                return
            try:
                req = json.loads(line)
                if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                    raise ValueError("a request is a JSON object with an `op` string")
            except ValueError as e:
                write({"ok": False, "error": f"bad request: {e}"})
                return
            op = self.ops.get(req["op"])
            if op is None:
                write({"ok": False, "error": f"unknown op {req['op']!r}"})
                return
            why = self.authorize(peer, op)
            if why is not None:
                log.warning("refused %s from pid %d uid %d: %s", req["op"], peer.pid, peer.uid, why)
                write({"ok": False, "error": f"permission denied: {why}"})
                return
            reply = op.fn(Call(peer, req, write, sock))
            if reply is not None:
                write({"ok": True, "result": reply})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # one bad request must never take the daemon down
            log.exception("control request failed")
            with contextlib.suppress(OSError):
                write({"ok": False, "error": str(e)})


class ControlClient:
    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def _open(self, req: dict[str, Any]) -> tuple[socket.socket, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise ControlError(f"cannot reach the daemon at {self.path}: {e.strerror or e}") from None
        s.sendall((json.dumps(req) + "\n").encode())
        return s, s.makefile("rb")

    @staticmethod
    def _head(line: bytes) -> dict[str, Any]:
        """The first reply line; raises ControlError for a refusal or a closed connection."""
        if not line:
            raise ControlError("the daemon closed the connection")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "request failed"))
        return reply

    def request(self, op: str, **args: Any) -> Any:
        s, f = self._open({"op": op, **args})
        with s, f:
            return self._head(f.readline()).get("result")

    def stream(self, op: str, **args: Any) -> Iterator[dict[str, Any]]:
        s, f = self._open({"op": op, **args})
        s.settimeout(None)
        with s, f:
            self._head(f.readline())
            for line in f:
                yield json.loads(line)
