"""Control socket: newline-delimited JSON over a Unix stream socket.

Callers are authenticated by the kernel (SO_PEERCRED), never by anything they
say: root, or a member of the control group, may read.  Operations marked
`privileged` are refused to any process inside an agent session, even root,
so an agent cannot act on its own audit or approvals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agentwarden.core import identity
from agentwarden.enforce import callers

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024


class BadRequest(ValueError):
    """An operation's arguments are wrong: the caller is told why; not a failure of the daemon."""


class ControlError(RuntimeError):
    pass


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    pidfd: int | None = None   # pins the process (SO_PEERPIDFD); closed when the request ends


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    pidfd = callers.peer_pidfd(sock)
    if pidfd is not None and callers.pidfd_pid(pidfd) != pid:
        os.close(pidfd)
        raise ControlError(f"the caller (pid {pid}) exited before it could be judged")
    groups: set[int] = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return Peer(pid, uid, gid, frozenset(groups), pidfd)


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
    """One thread owns the listening socket and every connection still sending its request
    (a selector, no thread per idle client); a connection whose request line is complete is
    served on a thread of its own.  At most MAX_CONNECTIONS connections are open at once
    (past that a caller is told the daemon is busy), and a request line must arrive within
    REQUEST_TIMEOUT_S, so no client can starve the socket by connecting and saying nothing."""

    MAX_CONNECTIONS = 64
    MAX_AGENT_CONNECTIONS = 4     # all processes inside agent sessions together
    MAX_USER_CONNECTIONS = 8      # each other uid but root
    ADMIN_RESERVE = 16            # connections only root can take
    REQUEST_TIMEOUT_S = 5.0

    def __init__(self, path: str, group: str, ops: dict[str, Operation],
                 in_agent_session: Callable[[int], bool]) -> None:
        self.path = path
        self.group = group
        self.ops = ops
        self.in_agent_session = in_agent_session
        self._gid: int | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._bound: tuple[int, int] = (0, 0)
        self._rebound: tuple[socket.socket, socket.socket] | None = None   # for the serving thread
        self._by_class: dict[str, int] = {}           # "agent", "uid:N", "admin" -> open connections
        self._class_of: dict[int, str] = {}           # connection fd -> its class
        self._open_lock = threading.Lock()
        self.stats = {"refused_busy": 0, "timed_out": 0}

    def authorize(self, peer: Peer, op: Operation) -> str | None:
        """None when allowed, else the reason for the refusal."""
        if not op.public and peer.uid != 0 and (self._gid is None or self._gid not in peer.groups):
            return f"uid {peer.uid} is neither root nor in group {self.group!r}"
        if op.privileged and self.in_agent_session(peer.pid):
            return f"pid {peer.pid} runs inside an agent session"
        return None

    def _bind(self) -> None:
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            os.makedirs(parent, exist_ok=True)
            # explicitly: the daemon's umask (027, daemon/secure.py) would hide the socket from the
            # public operations (a launcher approving their own held command)
            os.chmod(parent, 0o755)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bind with a tight umask, so the socket is never briefly world-connectable
        old = os.umask(0o117)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(128)
        sock.setblocking(False)
        os.chown(self.path, 0, self._gid if self._gid is not None else 0)
        # connectable by everyone when some operation is public; SO_PEERCRED decides per operation
        os.chmod(self.path, 0o666 if any(op.public for op in self.ops.values()) else 0o660)
        st = os.stat(self.path)
        self._bound = (st.st_dev, st.st_ino)
        self._sock = sock

    def start(self) -> None:
        self._gid = identity.group_gid(self.group)   # the host's group, in a container too
        if self._gid is None:
            log.warning("group %r does not exist: only root can use %s", self.group, self.path)
        self._bind()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        log.info("control socket %s ready", self.path)

    def check(self) -> str:
        """Recreate the socket if someone removed or replaced it; what happened, "" if nothing."""
        assert self._sock is not None
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                return ""
            what = f"control socket {self.path} was replaced"
        except FileNotFoundError:
            what = f"control socket {self.path} was removed"
        old = self._sock
        self._bind()
        self._rebound = (old, self._sock)
        return what + ": recreated"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # ---- connections ----------------------------------------------------------------------

    def _serve(self) -> None:
        import selectors
        import time

        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        pending: dict[socket.socket, tuple[float, bytearray]] = {}
        while not self._stop.is_set():
            if self._rebound is not None:   # check() made a new listening socket
                old, new = self._rebound
                self._rebound = None
                with contextlib.suppress(KeyError, ValueError):
                    sel.unregister(old)
                old.close()
                sel.register(new, selectors.EVENT_READ, None)
            for key, _ in sel.select(0.5):
                if key.data is None:
                    self._accept(key.fileobj, sel, pending)  # type: ignore[arg-type]
                    continue
                conn: socket.socket = key.fileobj  # type: ignore[assignment]
                _, buf = pending[conn]
                try:
                    chunk = conn.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(conn)
                    del pending[conn]
                    self._close(conn)
                    continue
                buf += chunk
                if b"\n" in buf or len(buf) > MAX_REQUEST:
                    sel.unregister(conn)
                    del pending[conn]
                    threading.Thread(target=self._run, args=(conn, bytes(buf)), name="control-request",
                                     daemon=True).start()
            now = time.monotonic()
            for conn, (since, _) in list(pending.items()):
                if now - since > self.REQUEST_TIMEOUT_S:
                    self.stats["timed_out"] += 1
                    sel.unregister(conn)
                    del pending[conn]
                    self._close(conn)
        for conn in pending:
            self._close(conn)
        sel.close()

    def _accept(self, listener: socket.socket, sel: Any,
                pending: dict[socket.socket, tuple[float, bytearray]]) -> None:
        import selectors
        import time

        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        cls, cap = self._class(conn)
        with self._open_lock:
            total = sum(self._by_class.values())
            others = total - self._by_class.get("admin", 0)
            busy = (total >= self.MAX_CONNECTIONS or self._by_class.get(cls, 0) >= cap
                    or (cls != "admin" and others >= self.MAX_CONNECTIONS - self.ADMIN_RESERVE))
            if not busy:
                self._by_class[cls] = self._by_class.get(cls, 0) + 1
                self._class_of[conn.fileno()] = cls
        if busy:
            self.stats["refused_busy"] += 1
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(b'{"ok":false,"error":"the daemon is busy: too many control connections"}\n')
            conn.close()
            return
        conn.setblocking(False)
        pending[conn] = (time.monotonic(), bytearray())
        sel.register(conn, selectors.EVENT_READ, True)

    def _class(self, conn: socket.socket) -> tuple[str, int]:
        """Who may hold how many connections: an agent cannot starve the people who approve,
        and one user cannot starve another (root and the control group share the rest)."""
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", raw)
        except OSError:
            return "unknown", 1
        if self.in_agent_session(pid):
            return "agent", self.MAX_AGENT_CONNECTIONS
        if uid == 0:
            return "admin", self.MAX_CONNECTIONS
        return f"uid:{uid}", self.MAX_USER_CONNECTIONS

    def _close(self, conn: socket.socket) -> None:
        with self._open_lock:
            cls = self._class_of.pop(conn.fileno(), None)
            if cls is not None:
                self._by_class[cls] -= 1
        with contextlib.suppress(OSError):
            conn.close()

    def _run(self, conn: socket.socket, first: bytes) -> None:
        try:
            conn.setblocking(True)
            with conn.makefile("wb") as wfile:
                self._handle(conn, first, wfile)
        except OSError:
            pass
        finally:
            self._close(conn)

    def _handle(self, sock: socket.socket, first: bytes, wfile: Any) -> None:
        lock = threading.Lock()

        def write(obj: dict[str, Any]) -> None:
            data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()
            with lock:
                wfile.write(data)
                wfile.flush()

        peer: Peer | None = None
        try:
            peer = peer_of(sock)
            line = first.split(b"\n", 1)[0]
            try:
                if len(line) > MAX_REQUEST:
                    raise ValueError(f"request longer than {MAX_REQUEST} bytes")
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
        except BadRequest as e:
            with contextlib.suppress(OSError):
                write({"ok": False, "error": str(e)})
        except Exception as e:  # one bad request must never take the daemon down
            log.exception("control request failed")
            with contextlib.suppress(OSError):
                write({"ok": False, "error": str(e)})
        finally:
            if peer is not None and peer.pidfd is not None:
                os.close(peer.pidfd)


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
