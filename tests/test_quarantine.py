"""Quarantine with real nftables and real sockets on loopback (needs root).

The output hook rejects a quarantined socket's packets as "administratively
prohibited": TCP connect() fails at once with EHOSTUNREACH (a plain drop would
leave it retrying its SYN for two minutes), UDP send() with EPERM.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from agentwarden.enforce.quarantine import MARK_BASE, RULES, Entry, Quarantine, QuarantineError
from agentwarden.probes.guard import UNGUARDED_MARK

if os.geteuid() != 0:
    pytest.skip("nftables quarantine tests need root", allow_module_level=True)

MARK = Quarantine.mark_for(0x123)
OTHER = Quarantine.mark_for(0x124)


def server(host: str) -> Iterator[int]:
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen(64)

    def accept() -> None:
        while True:
            try:
                srv.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def port() -> Iterator[int]:
    yield from server("127.0.0.1")


@pytest.fixture
def port2() -> Iterator[int]:
    yield from server("127.0.0.2")


@pytest.fixture
def q() -> Iterator[Quarantine]:
    quarantine = Quarantine(f"aw_test_{os.getpid()}")
    quarantine.ensure()
    yield quarantine
    quarantine.remove()


def connects(port: int, mark: int | None = MARK, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True if a TCP connect succeeds; False if the quarantine refuses it (EHOSTUNREACH)."""
    with socket.socket() as s:
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            return True
        except OSError as e:
            if e.errno != errno.EHOSTUNREACH:
                raise
            return False


def nft_list(q: Quarantine) -> str:
    return subprocess.run(["nft", "list", "table", "inet", q.table], check=True, capture_output=True,
                          text=True).stdout


def output_rules(q: Quarantine) -> int:
    return sum(1 for line in nft_list(q).splitlines() if "reject" in line)


def test_session_blocks_only_marked_sockets(q: Quarantine, port: int) -> None:
    assert connects(port)
    q.session(MARK, 60)
    assert not connects(port)
    assert connects(port, mark=None)
    assert connects(port, mark=OTHER)
    [entry] = q.entries()
    assert (entry.mark, entry.dst) == (MARK, "") and 55 <= entry.expires_s <= 60
    assert f"{MARK:#x} timeout" in nft_list(q)
    assert q.release(MARK) >= 1
    assert q.entries() == []
    assert connects(port)
    assert q.release(MARK) == 0


def test_errnos(q: Quarantine, port: int) -> None:
    q.session(MARK, 60)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        with pytest.raises(OSError) as exc:
            u.sendto(b"x", ("127.0.0.1", port))
        assert exc.value.errno == errno.EPERM
    with socket.socket() as s:   # the reject answers the SYN: no two-minute retry
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        s.settimeout(5)
        with pytest.raises(OSError) as exc:
            s.connect(("127.0.0.1", port))
        assert exc.value.errno == errno.EHOSTUNREACH


def test_destination_blocks_one_address(q: Quarantine, port: int, port2: int) -> None:
    q.destination(MARK, "127.0.0.1", 60)
    assert not connects(port)
    assert connects(port2, host="127.0.0.2")
    assert connects(port, mark=OTHER)
    q.destination(MARK, "::1", 60)
    q.destination(MARK, "::ffff:127.0.0.2", 60)   # what a v4-mapped socket sends is IPv4
    assert {(e.mark, e.dst) for e in q.entries()} == {(MARK, "127.0.0.1"), (MARK, "127.0.0.2"), (MARK, "::1")}
    assert not connects(port2, host="127.0.0.2")
    assert q.release(MARK) == 3
    assert connects(port)


def test_requarantine_refreshes_and_never_shortens(q: Quarantine) -> None:
    q.session(MARK, 10)
    q.session(MARK, 100)
    assert [e.expires_s for e in q.entries()] == [pytest.approx(100, abs=2)]
    q.session(MARK, 5)
    assert [e.expires_s for e in q.entries()] == [pytest.approx(100, abs=2)]
    q.session(MARK, 0)
    assert q.entries() == [Entry(MARK, "", 0)]


def test_expiry(q: Quarantine, port: int) -> None:
    q.session(MARK, 1)
    assert not connects(port, timeout=0.3)
    time.sleep(2.5)
    assert q.entries() == []
    assert connects(port)


def test_ensure_is_idempotent_and_survives_restart(q: Quarantine, port: int) -> None:
    q.session(MARK, 60)
    q.destination(OTHER, "127.0.0.1", 60)
    assert output_rules(q) == len(RULES)
    q.ensure()
    restarted = Quarantine(q.table)
    restarted.ensure()
    assert output_rules(q) == len(RULES)
    assert {(e.mark, e.dst) for e in restarted.entries()} == {(MARK, ""), (OTHER, "127.0.0.1")}
    assert not connects(port)


def test_a_connection_the_guard_had_no_room_for_is_reset(q: Quarantine, port: int) -> None:
    """The mark sock_ops gives a connection the SQL/HTTP guard cannot hold: what it sends next is
    answered with a reset, so it never reaches the server and the client fails at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, UNGUARDED_MARK)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(3):   # the first send is buffered; the reset answers its segment
                s.sendall(b"Q\0\0\0\x0dselect 1\0")
                time.sleep(0.1)
    assert Quarantine.slot_of(UNGUARDED_MARK) is None   # no session's mark
    assert connects(port)                               # other connections are untouched


def test_validation() -> None:
    assert Quarantine.mark_for(1) == MARK_BASE | 1
    assert Quarantine.mark_for(0x3FFF) == 0x61773FFF
    for bad in (0, 0x4000, -1):
        with pytest.raises(ValueError):
            Quarantine.mark_for(bad)
    with pytest.raises(ValueError):
        Quarantine("bad name; flush ruleset")
    q = Quarantine("aw_never_created")
    with pytest.raises(ValueError):
        q.session(0, 60)              # mark 0 would cut off every unmarked socket
    with pytest.raises(ValueError):
        q.destination(0x12340001, "127.0.0.1", 60)
    with pytest.raises(QuarantineError, match="No such file"):
        q.entries()
    q.remove()                        # a missing table is fine
