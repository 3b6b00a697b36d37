"""Tamper evidence for the audit trail: a hash chain over the stored events, signed checkpoints,
and the check that reads them back (`agentwarden verify`).

ClickHouse keeps no insertion order, and the table is ordered by user and session, so the chain
has an order of its own: a per-host `seq`, given to each event as its batch is about to be made
durable (inserted or spooled), with

    hash = SHA-256(DOMAIN || prev_hash || SHA-256(canonical(stored event)))

where `canonical` is the JSON of the stored row's values (the masked event, as ClickHouse keeps
it: ts in ns, floats as floats, maps with sorted keys) in the order of `CHAIN_COLUMNS`, so the
same bytes come back from the table.  The chain's head (next seq, last hash) is written to a state
file *before* a batch is written (and the batch's seq range marked pending until it is durable),
so a crash never reuses a seq; what a crash may have lost is declared by a `lost` event at the next
start (reason `chain: seq A-B ...`), and so is a sealed batch that a full spool dropped.  A missing
seq the trail does not declare can only be a deletion.

Checkpoints sign `(host, seq, hash, ts)` with the host's Ed25519 key (root-only, made at the first
start) every N events or T seconds, at start, at stop and as an idle heartbeat; they go to their
own table and to an append-only anchor file (put it, or ship it, off the box: a root attacker on
the host can sign false checkpoints from then on, but cannot rewrite what was anchored elsewhere).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentwarden.core.events import ChainInfo, Event
from agentwarden.core.files import write_atomic
from agentwarden.daemon import schema
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

# v2 links an event's digest, not its bytes: a session's bundle (daemon/bundle.py) carries the
# digests of the other sessions' events between its own, so it verifies without their content.
DOMAIN = b"agentwarden/chain/v2\x00"
CHECKPOINT_DOMAIN = b"agentwarden/checkpoint/v1\x00"
GENESIS = "0" * 64

# the columns an event's hash covers (since v1): every column of the event but the chain's own.
# A column added later is not covered by the hashes of old rows (they would change): adding one means a new
# DOMAIN version, and verify reading both.
CHAIN_COLUMNS: tuple[str, ...] = tuple(c.name for c in schema.COLUMNS if not c.name.startswith("chain_"))
_N = len(CHAIN_COLUMNS)
assert schema.COLUMN_NAMES[:_N] == CHAIN_COLUMNS, "the chain's columns must come first in schema.COLUMNS"
assert schema.COLUMN_NAMES[_N:_N + 3] == ("chain_seq", "chain_prev_hash", "chain_hash")
_TYPES = {c.name: c.type for c in schema.COLUMNS}
_FLOATS = tuple(i for i, n in enumerate(CHAIN_COLUMNS) if "Float" in _TYPES[n])
_BOOLS = tuple(i for i, n in enumerate(CHAIN_COLUMNS) if "Bool" in _TYPES[n])
_INTS = tuple(i for i, n in enumerate(CHAIN_COLUMNS) if "Int" in _TYPES[n] and "Float" not in _TYPES[n])
_TS = CHAIN_COLUMNS.index("ts")
_ID = CHAIN_COLUMNS.index("event_id")


def _normal(values: Sequence[Any]) -> list[Any]:
    """A row's values as the table gives them back: a Float64 column holds 3.0 where Python had 3,
    a Bool column True where it had 1."""
    out = list(values)
    n = len(out)     # without the later columns, when they are all empty (canonical)
    for i in _FLOATS:
        if i < n and out[i] is not None:
            out[i] = float(out[i])
    for i in _BOOLS:
        if i < n and out[i] is not None:
            out[i] = bool(out[i])
    for i in _INTS:
        if i < n and out[i] is not None:
            out[i] = int(out[i])
    out[_ID] = str(out[_ID]).lower()
    return out


# json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False), without building an
# encoder for each event (1.3 µs of the 9 a canonical form takes)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# Columns added after the chain was (schema.LATER_GENERATIONS, each a run of columns added at once,
# the latest last): an event's chained values leave out the latest generations while every column of
# them is empty, so trails sealed before they existed verify as they were, and filling one of them in
# on such a row changes its digest like any other edit.
LATER = tuple(CHAIN_COLUMNS.index(c) for c in schema.LATER_GENERATIONS)


def canonical(values: Sequence[Any]) -> bytes:
    for gen in range(len(LATER) - 1, -1, -1):
        # empty: NULL, [] or {}; from the second generation on also "" (the cause of an event sealed
        # before cause_model has "" there: its fields are strings), kept as it was for the first
        if not all(v is None or v == [] or v == {} or (gen and v == "") for v in values[LATER[gen]:]):
            break
        values = values[:LATER[gen]]
    return _CANONICAL.encode(_normal(values)).encode()


def digest(values: Sequence[Any]) -> bytes:
    """What the chain links of an event: SHA-256 of its canonical stored values."""
    return hashlib.sha256(canonical(values)).digest()


def link_digest(prev_hash: str, event_digest: bytes) -> str:
    return hashlib.sha256(DOMAIN + bytes.fromhex(prev_hash) + event_digest).hexdigest()


def link(prev_hash: str, values: Sequence[Any]) -> str:
    return link_digest(prev_hash, digest(values))


def event_values(ev: Event) -> list[Any]:
    """The chain's values of an event, from the same row the store inserts."""
    return schema.event_to_row(ev)[:_N]


def stored_values(row: dict[str, Any]) -> list[Any]:
    """The chain's values of a row read with schema.select_list() (ts and event_id renamed)."""
    out: list[Any] = []
    for name in CHAIN_COLUMNS:
        if name == "ts":
            out.append(int(row.get("ts_ns", row.get("ts")) or 0))
        elif name == "event_id":
            out.append(str(row.get("event_id_str", row.get("event_id"))))
        else:
            v = row.get(name)
            out.append(list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v)
    return out


# ---- keys -------------------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_or_create_key(path: str) -> Ed25519PrivateKey:
    """The host's signing key (PEM, root 0600), made on first use; its public half beside it
    (`PATH.pub`, 0644) for `agentwarden key show` and the auditors."""
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        log.info("made the chain's signing key %s (public key id %s)", path, key_id(key.public_key()))
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    pub, text = path + ".pub", public_pem(key.public_key())
    try:
        with open(pub, encoding="ascii") as f:
            current = f.read()
    except (OSError, ValueError):
        current = ""
    if current != text:   # missing, or another key's: the public half always matches the key
        write_atomic(pub, text, mode=0o644, sync=False)
    return key


def load_public(path: str) -> Ed25519PublicKey:
    with open(path, "rb") as f:
        key = serialization.load_pem_public_key(f.read())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


# ---- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    host: str
    seq: int              # the last event it covers (0: none yet)
    hash: str             # that event's hash (GENESIS for none)
    ts_ns: int
    reason: str           # start, stop, every, interval, idle
    key_id: str
    signature: str        # hex of the Ed25519 signature over message()

    def message(self) -> bytes:
        return CHECKPOINT_DOMAIN + json.dumps([self.host, self.seq, self.hash, self.ts_ns],
                                              separators=(",", ":")).encode()

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "seq": self.seq, "hash": self.hash, "ts_ns": self.ts_ns,
                "reason": self.reason, "key_id": self.key_id, "signature": self.signature}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Checkpoint:
        return cls(str(d["host"]), int(d["seq"]), str(d["hash"]), int(d["ts_ns"]), str(d.get("reason", "")),
                   str(d["key_id"]), str(d["signature"]))

    def valid(self, keys: dict[str, Ed25519PublicKey]) -> bool:
        key = keys.get(self.key_id)
        if key is None:
            return False
        try:
            key.verify(bytes.fromhex(self.signature), self.message())
            return True
        except (InvalidSignature, ValueError):
            return False


def sign(key: Ed25519PrivateKey, host: str, seq: int, head: str, reason: str) -> Checkpoint:
    unsigned = Checkpoint(host, seq, head, time.time_ns(), reason, key_id(key.public_key()), "")
    return Checkpoint(**{**unsigned.__dict__, "signature": key.sign(unsigned.message()).hex()})


# ---- the writer's side ----------------------------------------------------------------------


class Chain:
    """The head of this host's chain, its state file, and when to checkpoint.  seal() and durable()
    are called by the store writer around each durable write (daemon/store.py)."""

    def __init__(self, host: str, state_path: str, key: Ed25519PrivateKey, anchor_path: str = "",
                 every: int = 1000, interval_s: float = 60.0) -> None:
        self.host = host
        self.state_path = state_path
        self.key = key
        self.anchor_path = anchor_path
        self.every = every
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self.next_seq = 1
        self.head = GENESIS
        self.crash_gap: tuple[int, int] | None = None    # seqs a crash may have lost (from the state)
        self.gap_reason = "were being stored when the daemon stopped; any of them missing were lost"
        self._pending: list[tuple[int, int]] = []         # sealed, not yet durable
        self.inserted: tuple[int, str] = (0, GENESIS)      # the newest seq in the table (checkpoints sign it)
        self._since_checkpoint = 0
        self._last_checkpoint = 0.0
        self._unsaved: list[Checkpoint] = []     # made, not yet in the checkpoint table
        self._load()

    def _load(self) -> None:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                st = json.load(f)
        except FileNotFoundError:
            self._lost_state("missing")
            return
        except (OSError, ValueError) as e:
            self._lost_state(f"unreadable ({e})")
            return
        self.next_seq, self.head = int(st["next_seq"]), str(st["head"])
        pending = [(int(a), int(b)) for a, b in st.get("pending") or []]
        if pending:
            self.crash_gap = (min(a for a, _ in pending), max(b for _, b in pending))
            self._pending = pending     # still pending until the declaration itself is durable

    def _lost_state(self, why: str) -> None:
        """No head to go on from.  At the first start (no checkpoint anchored) the chain begins at 1.
        Otherwise the head was lost (a restored backup, a wiped /var/lib): the store, when it
        answers, says where its chain ends (reconcile), but what is spooled before that would reuse
        seqs.  So the chain goes on far past the last anchored checkpoint (2^32 seqs, more than any
        run between two checkpoints) and declares the seqs in between, in the chain itself: verify
        reads them as declared, and the events that were stored among them are still checked."""
        last = _last_anchored(self.anchor_path, self.host)
        if last is None:
            if why != "missing":
                log.error("chain state %s %s and no checkpoint anchored: the chain starts at 1",
                          self.state_path, why)
            return
        self.next_seq = last + LOST_STATE_JUMP
        self.crash_gap = (last + 1, self.next_seq - 1)
        state = why.split(" (")[0]
        self.gap_reason = f"are unknown: the chain's state file was {state}; it goes on after them"
        log.error("chain state %s %s: the chain goes on at seq %d, past the last anchored checkpoint (%d), "
                  "and declares the seqs between", self.state_path, why, self.next_seq, last)

    def _save(self, next_seq: int, head: str, pending: list[tuple[int, int]], sync: bool = True) -> None:
        """sync: on disk before the batch is written (seal).  Clearing a pending range (durable)
        need not be: lost to a crash, the range is declared again, and found present (info)."""
        data = json.dumps({"host": self.host, "next_seq": next_seq, "head": head,
                           "pending": [list(p) for p in pending]})
        write_atomic(self.state_path, data, sync=sync, sync_dir=sync)

    def seal(self, events: Sequence[Event]) -> list[list[Any]]:
        """Give the events that have none their seq and hashes, and write the new head ahead of
        the batch (its seqs pending): a crash from here on declares them at the next start.
        All or nothing: the head moves only once every event is sealed and the state is written.
        Returns the events' store rows, chain columns filled (the insert takes them: building a
        row is a quarter of sealing's cost)."""
        rows = []
        with self._lock:
            seq, head = self.next_seq, self.head
            given: list[tuple[Event, ChainInfo]] = []
            for ev in events:
                row = schema.event_to_row(ev)
                if ev.chain is None:     # else sealed before: a batch that failed to insert, now spooled
                    h = link(head, row[:_N])
                    given.append((ev, ChainInfo(seq=seq, prev_hash=head, hash=h)))
                    row[_N:_N + 3] = [seq, head, h]
                    head, seq = h, seq + 1
                rows.append(row)
            if given:
                self._save(seq, head, [*self._pending, (self.next_seq, seq - 1)])
                self._pending.append((self.next_seq, seq - 1))
                self.next_seq, self.head = seq, head
                for ev, info in given:
                    ev.chain = info
        return rows

    def durable(self, events: Sequence[Event], stored: bool = True, inserted: bool = False) -> None:
        """The batch is in the store or the spool (stored), and maybe in the table (inserted): no
        crash can lose it silently now.  A batch dropped by a full spool (stored=False) stays
        pending, so a crash still declares it, until a `lost` report naming its seqs is durable."""
        seqs = [ev.chain.seq for ev in events if ev.chain is not None]
        declared = [(int(a), int(b)) for ev in events if ev.kind == "lost" and ev.lost is not None
                    for a, b in _DECLARED.findall(ev.lost.reason)]
        with self._lock:
            done = [(min(seqs), max(seqs))] if seqs and stored else []
            if done or declared:
                self._pending = [(a, b) for a, b in self._pending
                                 if not any(x <= a and b <= y for x, y in [*done, *declared])]
                self._save(self.next_seq, self.head, self._pending, sync=False)
            if stored:
                self._since_checkpoint += len(events)
            if inserted and seqs:
                last = max((ev.chain for ev in events if ev.chain is not None), key=lambda c: c.seq)
                if last.seq > self.inserted[0]:
                    self.inserted = (last.seq, last.hash)

    def reconcile(self, top: int, head: str) -> str:
        """At the first connection: the table's newest seq for this host.  A state file that is
        behind it (lost, restored from a backup) would reuse seqs: the chain goes on after the
        table's head instead, and says so (the reason of a `lost` event; "" when all is well).
        A head that is not a hash, or a seq out of range, is not followed (a table writer's)."""
        if top >= 1 << 62 or not re.fullmatch(r"[0-9a-f]{64}", head or ""):
            if top:
                log.error("the store's chain head (seq %d, %.80r) is not believable: not followed", top, head)
            return ""
        with self._lock:
            if top < self.next_seq:
                return ""
            old, self.next_seq, self.head = self.next_seq, top + 1, head
            self._save(self.next_seq, self.head, self._pending)
        log.error("the chain's state (next seq %d) is behind the store (seq %d): going on after it", old, top)
        return f"chain: state file behind the store (next seq {old}, store at {top}); continuing after {top}"

    def checkpoint_due(self, now: float) -> str:
        """Why a checkpoint is due now ("" when none is)."""
        if self._since_checkpoint >= self.every:
            return "every"
        if now - self._last_checkpoint >= self.interval_s:
            return "interval" if self._since_checkpoint else "idle"
        return ""

    def checkpoint(self, reason: str) -> Checkpoint:
        """Sign the head now; anchored in the file at once, kept for the table (take_unsaved)."""
        with self._lock:
            # what is in the table: a sealed batch still on its way (spooled) is not signed yet
            cp = sign(self.key, self.host, self.inserted[0], self.inserted[1], reason)
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
            self._unsaved.append(cp)
            del self._unsaved[:-10_000]      # a long store outage: the anchor file has them all
        if self.anchor_path:
            try:
                fd = os.open(self.anchor_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    f.write(json.dumps(cp.to_json(), separators=(",", ":")) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                log.error("cannot append checkpoint %d to the anchor %s: %s", cp.seq, self.anchor_path, e)
        return cp

    def take_unsaved(self) -> list[Checkpoint]:
        with self._lock:
            out, self._unsaved = self._unsaved, []
        return out

    def give_back(self, cps: list[Checkpoint]) -> None:
        with self._lock:
            self._unsaved[:0] = cps


# ---- verification -------------------------------------------------------------------------------

_DECLARED = re.compile(r"seq (\d+)-(\d+)")
Row = tuple[int, str, str, list[Any], str, str]   # seq, prev_hash, hash, values, kind, lost reason


@dataclass
class Finding:
    severity: str         # tamper | info
    kind: str             # modified, missing, reordered, inserted, forged, truncated, bad_signature, ...
    seq: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "kind": self.kind, "seq": self.seq, "detail": self.detail}


@dataclass
class Report:
    host: str
    events: int = 0
    first_seq: int = 0
    last_seq: int = 0
    checkpoints: int = 0
    sealed_to: int = 0                     # the last seq a valid checkpoint covers
    findings: list[Finding] = field(default_factory=list)

    @property
    def tampered(self) -> bool:
        return any(f.severity == "tamper" for f in self.findings)

    def first_bad(self) -> int | None:
        bad = [f.seq for f in self.findings if f.severity == "tamper"]
        return min(bad) if bad else None

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "events": self.events, "first_seq": self.first_seq,
                "last_seq": self.last_seq, "checkpoints": self.checkpoints, "sealed_to": self.sealed_to,
                "tampered": self.tampered,
                "first_bad_seq": self.first_bad(), "findings": [f.to_json() for f in self.findings]}


def _link_ok(prev: str, values: list[Any], h: str) -> bool:
    try:
        return link(prev, values) == h
    except (ValueError, TypeError):     # a hash that is not hex, a value that is not JSON
        return False


def _ts_of(values: list[Any]) -> int:
    try:
        return int(values[_TS] or 0)
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0


def _covered(gap: tuple[int, int], ranges: list[tuple[int, int]]) -> bool:
    """Is the gap inside the union of the ranges (declarations may come in adjacent pieces)?"""
    need = gap[0]
    for a, b in sorted(ranges):
        if a > need:
            break
        need = max(need, b + 1)
        if need > gap[1]:
            return True
    return need > gap[1]


def verify(host: str, rows: Iterable[Row], checkpoints: Iterable[Checkpoint],
           keys: dict[str, Ed25519PublicKey], anchors: Iterable[Checkpoint] = (), retention_s: float = 0.0,
           now_ns: int | None = None) -> Report:
    """Check one host's chain.  rows: (seq, prev_hash, hash, values, kind, lost_reason) in seq
    order, streamed (only the hashes checkpoints name are kept); checkpoints: the table's, read
    *before* the rows (a live daemon signs more meanwhile); anchors: checkpoints kept elsewhere;
    retention_s: the table's TTL (0: forever), which tells expired events from deleted ones.

    A gap is declared only by a `lost` event the chain itself vouches for: one joined by unbroken
    links to a later event a trusted checkpoint signed (a row a table writer inserts is not), or,
    after the last checkpoint, as an unsealed declaration."""
    rep = Report(host)
    now_ns = now_ns if now_ns is not None else time.time_ns()

    def find(severity: str, kind: str, seq: int, detail: str) -> None:
        if len([f for f in rep.findings if f.kind == kind]) < 50:   # the first few of each: enough
            rep.findings.append(Finding(severity, kind, seq, detail))

    trusted: list[Checkpoint] = []
    for where, cps in (("", checkpoints), ("anchored ", anchors)):
        for cp in cps:
            rep.checkpoints += not where     # the table's
            if cp.host != host:
                continue
            if cp.valid(keys):
                trusted.append(cp)
            else:
                find("tamper", "bad_signature", cp.seq,
                     f"{where}checkpoint at seq {cp.seq} ({cp.reason}) is not signed by a trusted key")
    signed = {cp.seq for cp in trusted if cp.seq}
    named: dict[int, tuple[str, int]] = {}        # seq a checkpoint signs -> (its stored hash, run)
    gaps: list[tuple[int, int, int]] = []          # (first, last, ts of the row after the gap)
    declarations: list[tuple[int, int, list[tuple[int, int]]]] = []   # (row seq, run, ranges)
    run = 0
    prev_seq: int | None = None
    prev_hash = ""
    for seq, group in itertools.groupby(rows, key=lambda r: r[0]):
        rows_of_seq = list(group)
        if len(rows_of_seq) > 1:
            # the chain's row is one whose content hashes to its recorded hash (the first, if none
            # does); a retried insert stores the very same event again, and anything else under this
            # seq (even with the recorded hashes copied) is an event that was not in the chain
            rows_of_seq.sort(key=lambda r: not _link_ok(r[1], r[3], r[2]))
            first = rows_of_seq[0]
            for other in rows_of_seq[1:]:
                if other[2] == first[2] and other[1] == first[1] and _link_ok(other[1], other[3], other[2]):
                    find("info", "duplicate", seq, "the same event stored twice (a retried insert)")
                else:
                    find("tamper", "inserted", seq, "two different events claim this seq")
        _, prev, h, values, kind, reason = rows_of_seq[0]
        rep.events += 1
        if rep.events == 1:
            rep.first_seq = seq
        intact = _link_ok(prev, values, h)
        if not intact:
            find("tamper", "modified", seq, "the stored event does not hash to its recorded hash")
        joined = prev_seq is not None and seq == prev_seq + 1 and prev == prev_hash
        if prev_seq is not None:
            if seq == prev_seq + 1:
                if prev != prev_hash:
                    find("tamper", "reordered", seq, f"its previous hash is not seq {prev_seq}'s: rows were "
                         "moved, replaced or inserted")
            else:
                gaps.append((prev_seq + 1, seq - 1, _ts_of(values)))
        if not (joined and intact):
            run += 1            # a new stretch of the chain that vouches for itself only up to here
        if kind == "lost":
            ranges = [(int(a), int(b)) for a, b in _DECLARED.findall(reason)]
            if ranges:
                declarations.append((seq, run, ranges))
        if seq in signed:
            named[seq] = (h, run)
        prev_seq, prev_hash = seq, h
    rep.last_seq = prev_seq or 0
    # how far each stretch is vouched for: the furthest seq in it a trusted checkpoint signed
    vouched: dict[int, int] = {}
    for cp in trusted:
        got = named.get(cp.seq)
        if got is None or got[0] != cp.hash:
            continue
        vouched[got[1]] = max(vouched.get(got[1], 0), cp.seq)
    sealed_to = max((cp.seq for cp in trusted), default=0)
    sound = [r for s, run_of, ranges in declarations if vouched.get(run_of, 0) >= s for r in ranges]
    tail = [r for s, run_of, ranges in declarations if vouched.get(run_of, 0) < s and s > sealed_to
            for r in ranges]
    retention_ns = int(retention_s * 1e9)
    # the table's TTL removes events by their time, and seq order is only roughly time order: near
    # the horizon an expired event leaves a gap beside a kept one of a lower seq (partitions are by
    # day and expire at merges: two days of margin)
    horizon_ns = now_ns - retention_ns + 2 * 86_400 * 10**9 if retention_ns else 0
    for a, b, ts_after in gaps:
        if horizon_ns and ts_after and ts_after < horizon_ns:
            find("info", "horizon", a, f"seq {a}-{b} missing next to events near the retention horizon "
                 "(expired)")
            continue
        # a crash's declaration follows its gap; a full spool's comes with a later batch
        if _covered((a, b), sound):
            find("info", "declared_loss", a, f"seq {a}-{b} missing, declared lost by the trail itself")
        elif _covered((a, b), sound + tail):
            find("info", "declared_loss", a, f"seq {a}-{b} missing, declared lost after the last checkpoint "
                 "(vouched for by the next one)")
        else:
            find("tamper", "missing", a, f"seq {a}-{b} missing: deleted")
    for cp in trusted:
        if cp.seq == 0:
            continue
        got = named.get(cp.seq)
        if got is not None:
            if got[0] != cp.hash:
                find("tamper", "forged", cp.seq,
                     f"seq {cp.seq}'s hash is not the one signed in the checkpoint: the chain was recomputed")
            else:
                rep.sealed_to = max(rep.sealed_to, cp.seq)
        elif cp.seq < rep.first_seq or not rep.events:
            expired = retention_ns and cp.ts_ns < now_ns - retention_ns + 86_400 * 10**9
            if expired:
                find("info", "horizon", cp.seq, f"events up to seq {cp.seq} expired (retention)")
            else:
                find("tamper", "truncated_head", cp.seq, f"a signed checkpoint covers seq {cp.seq}, but the "
                     f"table starts at {rep.first_seq or 'nothing'}: its oldest events were deleted")
        elif cp.seq > rep.last_seq:
            find("tamper", "truncated", rep.last_seq + 1, f"a signed checkpoint covers seq {cp.seq}, "
                 f"the table ends at {rep.last_seq}: its newest events were deleted")
        elif not _covered((cp.seq, cp.seq), sound):
            find("tamper", "missing", cp.seq, f"seq {cp.seq}, which a checkpoint signed, is not in the table")
    if rep.events and rep.first_seq != 1 and not any(f.kind in ("horizon", "truncated_head")
                                                      for f in rep.findings):
        find("info", "horizon", rep.first_seq, f"the chain starts at seq {rep.first_seq} and no checkpoint "
             "says what came before (retention, or a chain begun from a restored state)")
    if rep.events and not trusted:
        find("tamper", "no_checkpoints", rep.first_seq, "no checkpoint signed by a trusted key: the daemon "
             "signs one at every start, so the checkpoint table was emptied (or the key is not this host's)")
    if rep.last_seq > rep.sealed_to and rep.events:
        find("info", "unsealed", rep.sealed_to + 1,
             f"seq {rep.sealed_to + 1}-{rep.last_seq} are after the last checkpoint (sealed by the next one)")
    return rep


LOST_STATE_JUMP = 1 << 32


def _last_anchored(path: str, host: str) -> int | None:
    """The newest seq the anchor file holds a checkpoint of for this host (its last 64 KiB: it only
    grows), None when it holds none."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    seqs = []
    for line in tail:
        try:
            d = json.loads(line)
            if d.get("host") == host:
                seqs.append(int(d["seq"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue             # the first line of the tail is cut; a torn last line
    return max(seqs) if seqs else None


def read_anchor(path: str) -> Iterator[Checkpoint]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield Checkpoint.from_json(json.loads(line))
