"""A session's self-verifying bundle: `agentwarden export SESSION --format jsonl` writes it,
`agentwarden verify --bundle FILE --key PUB` checks it anywhere, with no store and no daemon.

Sans-IO: the host's chain rows and checkpoints in, JSON lines out; lines and trusted keys in, a
report out.  One JSON object a line:

    {"bundle": "agentwarden-bundle/1", "host", "session", "chain": "v2", "columns", "keys", "events"}
    {"checkpoint": {...}}                 the checkpoints that seal the session's events
    {"start": {"seq", "prev_hash"}}       a run of consecutive seqs begins (again after a gap)
    {"event": {"seq", "prev_hash", "hash", "values"}}     one of the session's events, as stored
    {"digests": {"seq", "d": [hex, ...]}} the digests of the next seqs: other sessions' events
    {"end": {"events", "last_seq"}}

Why it verifies: the chain links each event's digest (chain.link_digest), so from the first
event's recorded previous hash, the session's events (hashed here from their values) and the
others' digests recompute every link up to a checkpoint; the checkpoint's signature then vouches
for every event before it in that run.  A changed event changes its link; one taken out, added,
or moved breaks the run; a new key is not the auditor's.  The other sessions' content never
leaves the host, only 32 bytes an event.

What it does not prove: that the bundle holds all of the session's events.  An event of the
session sent as a digest, not as an event, is indistinguishable from another session's (a
malicious exporter could hide one); `agentwarden verify` on the store is the completeness check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agentwarden.daemon import chain, schema
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

FORMAT = "agentwarden-bundle/1"
_SESSION = chain.CHAIN_COLUMNS.index("session_id")
_DIGESTS_PER_LINE = 1000


class BundleError(ValueError):
    """Not a bundle this version reads (the file, not the trail, is wrong)."""


def _pick(rows: list[chain.Row]) -> chain.Row:
    """One seq's row: the one whose content hashes to its record (a retried insert stores the same
    event twice; anything else under the seq is left for `verify` on the store to name)."""
    for r in rows:
        try:
            if chain.link(r[1], r[3]) == r[2]:
                return r
        except (ValueError, TypeError, OverflowError):
            continue
    return rows[0]


def build(host: str, session: str, rows: Iterable[chain.Row], checkpoints: Iterable[chain.Checkpoint],
          keys: dict[str, str], first_seq: int, last_seq: int) -> Iterator[dict[str, Any]]:
    """The bundle's lines.  rows: the host's chain in seq order from first_seq on (more is read
    only up to the checkpoint that seals last_seq); first_seq/last_seq: the session's own seqs;
    keys: key id -> public PEM, for the reader's information (verify trusts only the keys it is
    given).  Streams: a long stretch of other events costs one line per thousand digests."""
    cps = sorted((cp for cp in checkpoints if cp.host == host), key=lambda c: c.seq)
    seal = next((cp.seq for cp in cps if cp.seq >= last_seq), last_seq)
    yield {"bundle": FORMAT, "host": host, "session": session, "chain": "v2",
           "columns": list(chain.CHAIN_COLUMNS), "keys": keys}
    for cp in cps:
        if first_seq <= cp.seq <= seal:
            yield {"checkpoint": cp.to_json()}
    expect: int | None = None
    digests: list[str] = []
    digests_from = 0
    events = 0
    last = 0

    def flush() -> Iterator[dict[str, Any]]:
        if digests:
            yield {"digests": {"seq": digests_from, "d": list(digests)}}
            digests.clear()

    for row in _grouped(rows):
        seq, prev, h, values, _, _ = _pick(row) if len(row) > 1 else row[0]
        if seq < first_seq:
            continue
        if seq > seal:
            break
        if seq != expect:
            yield from flush()
            yield {"start": {"seq": seq, "prev_hash": prev}}
        if values[_SESSION] == session:
            yield from flush()
            yield {"event": {"seq": seq, "prev_hash": prev, "hash": h, "values": values}}
            events += 1
        else:
            if not digests:
                digests_from = seq
            try:
                digests.append(chain.digest(values).hex())
            except (ValueError, TypeError, OverflowError):   # not JSON: the store's row is damaged
                digests.append("")
            if len(digests) >= _DIGESTS_PER_LINE:
                yield from flush()
        expect, last = seq + 1, seq
    yield from flush()
    yield {"end": {"events": events, "last_seq": last}}


def _grouped(rows: Iterable[chain.Row]) -> Iterator[list[chain.Row]]:
    batch: list[chain.Row] = []
    for r in rows:
        if batch and r[0] != batch[0][0]:
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


@dataclass
class BundleReport:
    host: str = ""
    session: str = ""
    events: int = 0
    vouched: int = 0                    # events a trusted checkpoint's signature covers
    first_seq: int = 0
    last_seq: int = 0
    checkpoints: int = 0
    key_ids: list[str] = field(default_factory=list)      # the keys the bundle names
    findings: list[chain.Finding] = field(default_factory=list)

    @property
    def tampered(self) -> bool:
        return any(f.severity == "tamper" for f in self.findings)

    @property
    def complete(self) -> bool:
        """Every event it carries is vouched for by a signature."""
        return self.events > 0 and self.vouched == self.events and not self.tampered

    def first_bad(self) -> int | None:
        bad = [f.seq for f in self.findings if f.severity == "tamper"]
        return min(bad) if bad else None

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "session": self.session, "events": self.events, "vouched": self.vouched,
                "first_seq": self.first_seq, "last_seq": self.last_seq, "checkpoints": self.checkpoints,
                "key_ids": self.key_ids, "tampered": self.tampered, "complete": self.complete,
                "first_bad_seq": self.first_bad(), "findings": [f.to_json() for f in self.findings]}


_HASH = re.compile(r"[0-9a-f]{64}")
_KINDS = ("checkpoint", "start", "event", "digests", "end")
_POISON = "f" * 64          # a running hash no checkpoint signs: what follows in the run is unvouched


def _no_constant(name: str) -> Any:
    raise BundleError(f"{name} is not JSON a bundle holds")


def read(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The records of a bundle file: the header first, then one kind of record a line (a line
    carrying two would be read one way here and another way by any other reader)."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_no_constant)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BundleError(f"line {n} is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise BundleError(f"line {n} is not a bundle record")
        if n == 1 and "bundle" in obj:
            yield obj
            continue
        if len(obj) != 1 or next(iter(obj)) not in _KINDS or not isinstance(next(iter(obj.values())), dict):
            raise BundleError(f"line {n} is not one bundle record ({sorted(obj)[:4]})")
        yield obj


def _seq(value: Any) -> int:
    if type(value) is not int or not 1 <= value < 1 << 64:
        raise BundleError(f"a seq that is not a number from 1: {value!r}")
    return value


def _hash(value: Any) -> str:
    if not isinstance(value, str) or not _HASH.fullmatch(value):
        raise BundleError(f"a hash that is not 64 hex digits: {str(value)[:80]!r}")
    return value


def verify(records: Iterable[dict[str, Any]], keys: dict[str, Ed25519PublicKey]) -> BundleReport:
    """Recompute the chain through the bundle and check it against the checkpoints signed by the
    trusted keys.  Raises BundleError for a file that is not a well-formed bundle (a seq, hash or
    digest of the wrong shape included: no reading of such a file is vouched for)."""
    rep = BundleReport()
    it = iter(records)
    head = next(it, None)
    if head is None or head.get("bundle") != FORMAT:
        raise BundleError(f"not an {FORMAT} file (its first line must name the format)")
    columns = head.get("columns")
    # a bundle made before a later generation of columns (issue 15's llm, cause and http_rpc; then
    # cause_model and cause_provider) has the columns before it: its events were chained without them
    # (chain.canonical leaves them out while they are empty)
    shapes = (list(chain.CHAIN_COLUMNS), *(list(chain.CHAIN_COLUMNS[:start]) for start in chain.LATER))
    if head.get("chain") != "v2" or columns not in shapes:
        raise BundleError("the bundle's chain version or columns are not this version's")
    width = len(columns)
    rep.host, rep.session = str(head.get("host", "")), str(head.get("session", ""))
    rep.key_ids = sorted(str(k) for k in head.get("keys") or {})

    def find(severity: str, kind: str, seq: int, detail: str) -> None:
        if len([f for f in rep.findings if f.kind == kind]) < 50:
            rep.findings.append(chain.Finding(severity, kind, seq, detail))

    signed: dict[int, str] = {}
    running = ""                      # the chain's hash at the last seq read ("": no run yet)
    seq = 0                           # the last seq read (0: none)
    pending: list[int] = []           # the run's events no checkpoint has vouched for yet
    ended: dict[str, Any] | None = None

    def step(h: str) -> None:
        nonlocal running
        running = h
        if seq in signed:
            if signed[seq] == running:
                rep.vouched += len(pending)
                pending.clear()
            else:
                find("tamper", "forged", seq, f"the chain recomputed up to seq {seq} is not the one signed "
                     "there: an event before it was changed, removed or added")

    def out_of_place(got: int) -> int:
        """The seq a record says it starts at: the next one, or the run is broken (an event or
        digests taken out, added or moved) and nothing before it in the run can be vouched for."""
        nonlocal running
        if not running:
            raise BundleError(f"a record at seq {got} before any start record")
        if got != seq + 1:
            find("tamper", "missing" if got > seq + 1 else "inserted", min(got, seq + 1),
                 f"the bundle goes from seq {seq} to {got}: records were taken out, added or moved")
            pending.clear()
            running = _POISON
        return got

    for rec in it:
        if ended is not None:
            raise BundleError("records after the end record")
        kind, body = next(iter(rec.items()))
        if kind == "checkpoint":
            try:
                cp = chain.Checkpoint.from_json(body)
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                raise BundleError(f"a checkpoint that is not one: {e}") from None
            rep.checkpoints += 1
            if cp.seq < 1 or cp.host != rep.host:
                # seq 0 signs the empty chain (GENESIS): nothing a bundle's event can lead to
                find("tamper", "bad_signature", cp.seq, "a checkpoint of another host, or of no event")
            elif cp.valid(keys):
                signed[cp.seq] = cp.hash
            else:
                find("tamper", "bad_signature", cp.seq,
                     f"checkpoint at seq {cp.seq} is not signed by a trusted key (key id {cp.key_id!r})")
        elif kind == "start":
            at, prev = _seq(body.get("seq")), _hash(body.get("prev_hash"))
            if seq and at <= seq + 1:
                # a run starts again only after a gap (a loss the trail declared): a restart
                # without one would cut a changed event off from the checkpoint that judges it
                find("tamper", "reordered", at, "a run starts again without a gap before it")
                pending.clear()
                seq, running = max(seq, at - 1), _POISON
                continue
            if pending:
                find("info", "unvouched", pending[0], f"{len(pending)} events from seq {pending[0]} on are "
                     "followed by a gap before any checkpoint: nothing vouches for them (a crash's loss, "
                     "or the bundle was altered; verify the store)")
                pending.clear()
            seq, running = at - 1, prev
        elif kind == "event":
            seq = out_of_place(_seq(body.get("seq")))
            values = body.get("values")
            if not isinstance(values, list):
                raise BundleError(f"event seq {seq} has no values")
            recorded_prev, recorded = _hash(body.get("prev_hash")), _hash(body.get("hash"))
            rep.events += 1
            rep.first_seq = rep.first_seq or seq
            rep.last_seq = seq
            if len(values) != width or values[_SESSION] != rep.session:
                find("tamper", "inserted", seq, "an event of another session, or of another shape")
            if recorded_prev != running:
                find("tamper", "reordered", seq, "its recorded previous hash is not the chain's here")
            try:
                h = chain.link(running, values)
            except (ValueError, TypeError, OverflowError):
                h = _POISON
            if h != recorded:
                find("tamper", "modified", seq, "the event does not hash to its recorded hash")
                pending.clear()
                h = _POISON
            pending.append(seq)
            step(h)
        elif kind == "digests":
            seq = out_of_place(_seq(body.get("seq"))) - 1
            ds = body.get("d")
            if not isinstance(ds, list):
                raise BundleError(f"digests from seq {seq + 1} are not a list")
            for hx in ds:
                seq += 1
                if not isinstance(hx, str) or not _HASH.fullmatch(hx):
                    find("tamper", "modified", seq, "a digest that is not 32 bytes of hex")
                    pending.clear()
                    step(_POISON)
                else:
                    step(chain.link_digest(running, bytes.fromhex(hx)))
        else:
            ended = body
    if ended is None:
        find("tamper", "truncated", seq + 1, "the bundle has no end record: it was cut")
    elif ended.get("events") != rep.events:
        find("tamper", "truncated", seq, f"the end record counts {str(ended.get('events'))[:20]} events, "
             f"the bundle holds {rep.events}")
    if pending:
        find("info", "unsealed", pending[0], f"{len(pending)} events from seq {pending[0]} on are not "
             "followed by a checkpoint in the bundle (export again after the next checkpoint)")
    if not rep.events:
        find("info", "empty", 0, "the bundle holds no event")
    return rep


def events(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The session's events of a bundle as the public JSON contract (what replay reads)."""
    for rec in records:
        if "event" in rec:
            e = rec["event"]
            row = dict(zip(chain.CHAIN_COLUMNS, e["values"], strict=False))
            row.update(chain_seq=e["seq"], chain_prev_hash=e["prev_hash"], chain_hash=e["hash"])
            yield schema.row_to_event(row).to_dict()
