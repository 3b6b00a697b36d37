"""A session's self-verifying bundle (daemon/bundle.py): it verifies with the host's public key
alone, and each attack on the file is named: a field changed, an event taken out or added, a
digest of another session's event changed, the chain recomputed and signed with a new key, the
file cut short.  A gap the trail declared starts a new run, vouched for by a later checkpoint; an
event after the last checkpoint is unsealed, never vouched for."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from agentwarden.core.events import Event, ExecInfo, Identity, NetInfo, Process, SqlInfo
from agentwarden.daemon import bundle, chain

T0 = 1_795_000_000_000_000_000


def ev(session: str, i: int) -> Event:
    proc = Process(100 + i, 1, 1000, "/usr/bin/psql", ["psql", "-c", f"select {i}"], "/src")
    if i % 3 == 0:
        return Event(kind="exec", ts_ns=T0 + i, host="vm", session_id=session, agent="a",
                     identity=Identity(1000, "alice"), process=proc, exec=ExecInfo(filename="/usr/bin/psql"))
    return Event(kind="sql", ts_ns=T0 + i, host="vm", session_id=session, agent="a", identity=Identity(1000, "alice"),
                 process=proc, net=NetInfo("tcp", "127.0.0.1", 5432, protocol="postgres"),
                 sql=SqlInfo(f"select {i}", "SELECT", [], database="app", db_user="alice", rows=1, tag="SELECT 1",
                             duration_ms=0.5))


class Host:
    """A chain as the store holds it: rows (seq, prev, hash, values, kind, reason) and checkpoints."""

    def __init__(self, tmp: Path) -> None:
        self.key = chain.load_or_create_key(str(tmp / "k"))
        self.chain = chain.Chain("vm", str(tmp / "c.json"), self.key)
        self.rows: list[chain.Row] = []
        self.checkpoints: list[chain.Checkpoint] = []

    def record(self, events: list[Event], stored: bool = True) -> None:
        self.chain.seal(events)
        if stored:
            for e in events:
                assert e.chain
                self.rows.append((e.chain.seq, e.chain.prev_hash, e.chain.hash, chain.event_values(e), e.kind, ""))
        self.chain.durable(events, inserted=stored)

    def checkpoint(self) -> None:
        self.checkpoints.append(self.chain.checkpoint("every"))

    def bundle(self, session: str) -> list[dict[str, Any]]:
        seqs = [r[0] for r in self.rows if r[3][bundle._SESSION] == session]
        return list(bundle.build("vm", session, iter(self.rows), self.checkpoints, {}, min(seqs), max(seqs)))

    @property
    def keys(self) -> dict[str, Any]:
        pub = self.key.public_key()
        return {chain.key_id(pub): pub}


def interleaved(tmp: Path) -> Host:
    h = Host(tmp)
    for i in range(40):
        h.record([ev("s-A" if i % 4 == 0 else "s-B", i)])
        if i in (13, 39):
            h.checkpoint()
    return h


def check(records: list[dict[str, Any]], keys: dict[str, Any]) -> bundle.BundleReport:
    lines = [json.dumps(r) for r in records]           # through the file format
    return bundle.verify(bundle.read(lines), keys)


def kinds(rep: bundle.BundleReport) -> list[str]:
    return [f.kind for f in rep.findings if f.severity == "tamper"]


def test_an_untouched_bundle_verifies_and_carries_only_digests_of_the_others(tmp_path: Path) -> None:
    h = interleaved(tmp_path)
    recs = h.bundle("s-A")
    rep = check(recs, h.keys)
    assert rep.complete and not rep.findings and rep.events == rep.vouched == 10
    assert (rep.first_seq, rep.last_seq) == (1, 37)
    text = json.dumps(recs)
    assert "s-B" not in text and "select 1\"" not in text     # the other session's content stays home
    assert sum(len(r["digests"]["d"]) for r in recs if "digests" in r) == 40 - 10   # seqs 1..40, A's ten are events
    got = list(bundle.events(recs))
    assert [e["sql"]["query"] for e in got if e["kind"] == "sql"] == [f"select {i}" for i in range(4, 40, 4)
                                                                      if i % 3]
    assert all(e["chain"]["seq"] for e in got)


def test_a_changed_field_is_named_by_its_seq(tmp_path: Path) -> None:
    h = interleaved(tmp_path)
    recs = h.bundle("s-A")
    target = next(r for r in recs if "event" in r and r["event"]["seq"] == 9)
    i = chain.CHAIN_COLUMNS.index("sql_query")
    target["event"]["values"][i] = "select 'nothing to see'"
    rep = check(recs, h.keys)
    assert rep.tampered and rep.first_bad() == 9 and "modified" in kinds(rep)
    assert not rep.complete


@pytest.mark.parametrize("attack", ["drop-event", "add-event", "change-digest", "swap-events", "drop-digests",
                                    "cut-short", "wrong-end-count", "restart-around-a-change"])
def test_each_attack_on_the_file_is_found(tmp_path: Path, attack: str) -> None:
    h = interleaved(tmp_path)
    recs = h.bundle("s-A")
    events = [i for i, r in enumerate(recs) if "event" in r]
    if attack == "drop-event":
        del recs[events[3]]
    elif attack == "add-event":
        extra = copy.deepcopy(recs[events[2]])
        extra["event"]["values"][chain.CHAIN_COLUMNS.index("sql_query")] = "select 'planted'"
        recs.insert(events[2] + 1, extra)
    elif attack == "change-digest":
        d = next(r for r in recs if "digests" in r)
        d["digests"]["d"][0] = "00" * 32
    elif attack == "swap-events":
        a, b = events[1], events[2]
        recs[a]["event"]["values"], recs[b]["event"]["values"] = recs[b]["event"]["values"], recs[a]["event"]["values"]
    elif attack == "drop-digests":
        del recs[next(i for i, r in enumerate(recs) if "digests" in r)]
    elif attack == "cut-short":
        del recs[-1]
    elif attack == "wrong-end-count":
        recs[-1]["end"]["events"] += 1
    elif attack == "restart-around-a-change":
        # the changed event in a run of its own, re-hashed, and the chain taken up again after it
        at = events[2]
        e = recs[at]["event"]
        e["values"][chain.CHAIN_COLUMNS.index("sql_query")] = "select 'changed'"
        original = e["hash"]
        e["hash"] = chain.link(e["prev_hash"], e["values"])
        recs.insert(at + 1, {"start": {"seq": e["seq"] + 1, "prev_hash": original}})
        recs.insert(at, {"start": {"seq": e["seq"], "prev_hash": e["prev_hash"]}})
    rep = check(recs, h.keys)
    assert rep.tampered and not rep.complete, (attack, rep.findings)


def test_a_chain_recomputed_and_signed_with_another_key_is_not_the_hosts(tmp_path: Path) -> None:
    h = interleaved(tmp_path)
    (tmp_path / "forger").mkdir()
    forger = Host(tmp_path / "forger")
    for i in range(40):
        forger.record([ev("s-A" if i % 4 == 0 else "s-B", i)])
        if i in (13, 39):
            forger.checkpoint()
    rep = check(forger.bundle("s-A"), h.keys)       # the auditor trusts the host's key only
    assert rep.tampered and "bad_signature" in kinds(rep) and rep.vouched == 0


def test_a_declared_gap_starts_a_new_run_and_the_tail_is_unsealed(tmp_path: Path) -> None:
    h = Host(tmp_path)
    for i in range(10):
        h.record([ev("s-A" if i % 2 else "s-B", i)])
    h.checkpoint()
    h.record([ev("s-B", 10), ev("s-A", 11)], stored=False)       # a batch lost (declared in the real writer)
    for i in range(12, 20):
        h.record([ev("s-A" if i % 2 else "s-B", i)])
    h.checkpoint()
    h.record([ev("s-A", 21)])                                     # after the last checkpoint
    recs = h.bundle("s-A")
    assert [r["start"]["seq"] for r in recs if "start" in r] == [2, 13]
    rep = check(recs, h.keys)
    assert not rep.tampered and rep.events == 10 and rep.vouched == 9
    assert [f.kind for f in rep.findings] == ["unsealed"] and not rep.complete


def test_a_retried_insert_is_read_once(tmp_path: Path) -> None:
    h = interleaved(tmp_path)
    h.rows.insert(5, h.rows[4])                                   # seq 5 stored twice
    assert check(h.bundle("s-A"), h.keys).complete


def test_not_a_bundle_is_an_error_not_a_verdict(tmp_path: Path) -> None:
    with pytest.raises(bundle.BundleError):
        bundle.verify(bundle.read(["{\"bundle\": \"something else\"}"]), {})
    with pytest.raises(bundle.BundleError):
        bundle.verify(bundle.read(["not json"]), {})


# ---- the red team's attacks on the file (each once made verify report `complete`) ----------------


def test_a_made_up_event_cannot_ride_on_the_empty_chain(tmp_path: Path) -> None:
    """A link that failed to compute fell back to GENESIS, which the daemon's seq-0 start
    checkpoint signs: a fabricated event was vouched for."""
    h = Host(tmp_path)
    h.checkpoints.append(h.chain.checkpoint("start"))       # seq 0, GENESIS: what every start signs
    for i in range(1, 20):
        h.record([ev("s-A" if i % 4 == 0 else "s-B", i)])
    h.checkpoint()
    recs = h.bundle("s-A")
    recs.insert(1, {"checkpoint": h.checkpoints[0].to_json()})
    fake = chain.event_values(ev("s-A", 999))
    for start, event in (({"seq": 0, "prev_hash": "zz"}, {"seq": 0, "prev_hash": "zz", "hash": "", "values": fake}),
                         ({"seq": 1, "prev_hash": "zz"}, {"seq": 1, "prev_hash": "zz", "hash": "", "values": fake})):
        forged = [*recs[:2], {"start": start}, {"event": event}, *recs[2:]]
        with pytest.raises(bundle.BundleError):
            check(forged, h.keys)
    # well-formed, its hash made up: modified, and the seq-0 checkpoint vouches for nothing
    forged = [*recs[:2], {"start": {"seq": 1, "prev_hash": chain.GENESIS}},
              {"event": {"seq": 1, "prev_hash": chain.GENESIS, "hash": chain.GENESIS, "values": fake}}]
    rep = check([*forged, {"end": {"events": 1, "last_seq": 1}}], h.keys)
    assert rep.tampered and rep.vouched == 0 and "bad_signature" in kinds(rep)


def test_runs_cannot_be_replayed_or_reordered(tmp_path: Path) -> None:
    """A start record with an empty previous hash switched the restart check off, and a later
    start went back to replay the vouched runs again."""
    h = interleaved(tmp_path)
    recs = h.bundle("s-A")
    body = [r for r in recs if "bundle" not in r and "end" not in r]
    with pytest.raises(bundle.BundleError):
        check([recs[0], {"start": {"seq": 500, "prev_hash": ""}}, *body, recs[-1]], h.keys)
    twice = [recs[0], *body, *[r for r in body if "checkpoint" not in r],
             {"end": {"events": 2 * recs[-1]["end"]["events"], "last_seq": 40}}]
    rep = check(twice, h.keys)
    assert rep.tampered and "reordered" in kinds(rep) and not rep.complete


def test_a_line_is_one_record(tmp_path: Path) -> None:
    """An event hidden in a checkpoint's line: verify read the checkpoint, events() the event."""
    h = interleaved(tmp_path)
    recs = h.bundle("s-A")
    at = next(i for i, r in enumerate(recs) if "checkpoint" in r)
    extra = next(r for r in recs if "event" in r)
    recs[at] = {"bundle": "x", **recs[at], **extra}
    with pytest.raises(bundle.BundleError):
        check(recs, h.keys)


@pytest.mark.parametrize("line", ['{"start": {"seq": Infinity, "prev_hash": "00"}}', '{"end": "x"}', '{"end": [1]}',
                                  "[" * 100_000 + "]" * 100_000, '{"checkpoint": {"seq": 1}}',
                                  '{"digests": {"seq": 2, "d": "ab"}}', '{"event": {"seq": 2, "values": 3}}'])
def test_garbage_is_an_error_never_a_crash(tmp_path: Path, line: str) -> None:
    h = interleaved(tmp_path)
    lines = [json.dumps(r) for r in h.bundle("s-A")]
    with pytest.raises(bundle.BundleError):
        bundle.verify(bundle.read([lines[0], lines[1], line, *lines[2:]]), h.keys)


@pytest.mark.parametrize("generation", [0, 1])
def test_a_bundle_made_before_a_later_generation_of_columns_still_verifies(tmp_path: Path, generation: int) -> None:
    """Bundles exported before issue 15 carry the columns before llm, cause and http_rpc, and those
    exported before cause_model the columns before it, and values of that width: they verify as they
    did (the chain leaves the later columns out while empty)."""
    h = interleaved(tmp_path)
    recs = h.bundle("s-A")
    width = chain.LATER[generation]
    for r in recs:
        if "columns" in r:
            r["columns"] = r["columns"][:width]
        if "event" in r:
            values = r["event"]["values"]
            assert all(v in (None, [], {}) for v in values[width:])
            r["event"]["values"] = values[:width]
    rep = check(recs, h.keys)
    assert rep.complete and not rep.findings and rep.events == rep.vouched == 10
