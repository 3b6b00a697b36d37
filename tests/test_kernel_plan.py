"""Compiling a policy for the kernel: which rules the kernel may decide, and how it finds them."""

from __future__ import annotations

from pathlib import Path

from agentwarden.core.events import Identity
from agentwarden.enforce.kernel import compile_policy, session_mask
from agentwarden.enforce.policy import parse
from agentwarden.enforce.sqlnorm import command_hash, fnv

REPO = Path(__file__).resolve().parents[1]

POLICY = """
version: 1
rules:
  - name: admins-may
    when: {who: {groups: [admins]}, kind: sql}
    action: allow
  - name: no-drop
    when: {kind: sql, sql: {command: ["drop  table", "TRUNCATE"]}}
    action: deny
  - name: billing-tables
    when: {kind: sql, sql: {tables: ["billing.*"]}}
    action: kill
  - name: audit-by-regex
    when: {kind: sql, sql: {regex: ["pg_sleep"]}}
    action: audit
  - name: rm-anything
    when: {kind: exec, exec: {path: ["*/rm"]}}
    action: deny
  - name: git-force
    when: {kind: exec, exec: {path: ["*/git", "/opt/*/bin/tool"], argv: ["--force"]}}
    action: hold
    approvers: [self]
    timeout: 1m
  - name: metadata
    when: {kind: connect, connect: {dst: ["169.254.169.254/32", "fd00:ec2::254/128"], port: ["80", "8000-8001"]}}
    action: deny
  - name: by-name
    when: {kind: connect, connect: {dst: ["evil.example"]}}
    action: quarantine
    duration: 1h
"""


def test_exactness_and_candidates() -> None:
    plan = compile_policy(parse(POLICY))
    bit = {name: 1 << i for i, name in enumerate(
        ["admins-may", "no-drop", "billing-tables", "audit-by-regex", "rm-anything", "git-force", "metadata",
         "by-name"])}
    # the kernel decides command-only SQL, basename-only exec and CIDR/port connect rules
    assert plan.exact == bit["admins-may"] | bit["no-drop"] | bit["rm-anything"] | bit["metadata"]
    # an inexact allow/audit ends the kernel's walk undecided; inexact denials do not
    assert plan.soft == bit["audit-by-regex"]
    assert plan.sql_cmds[command_hash("DROP TABLE")] == bit["no-drop"]
    assert plan.sql_cmds[command_hash("truncate")] == bit["no-drop"]
    assert plan.sql_any == bit["admins-may"] | bit["billing-tables"] | bit["audit-by-regex"]
    assert plan.exec_names[b"rm"] == bit["rm-anything"] and plan.exec_names[b"git"] == bit["git-force"]
    assert plan.exec_any == bit["git-force"]          # /opt/*/bin/tool cannot be looked up by name
    v4 = (96 + 32, b"\0" * 10 + b"\xff\xff" + bytes([169, 254, 169, 254]))
    assert plan.connect_dsts[v4] == bit["metadata"] and len(plan.connect_dsts) == 2
    assert plan.ports == bit["metadata"] and sorted(plan.port_rules) == [80, 8000, 8001]
    assert plan.connect_any == bit["by-name"] and plan.quarantines and plan.identity_rules == bit["admins-may"]
    assert plan.mechanisms["no-drop"][1] == "before" and plan.mechanisms["billing-tables"][1] == "after"
    assert "SIGSTOP" in plan.mechanisms["git-force"][0] and "SIGKILL" in plan.mechanisms["rm-anything"][0]


def test_session_masks_follow_identity() -> None:
    pol = parse(POLICY)
    everyone = session_mask(pol, "cursor", Identity(user="bob"), frozenset({"dev"}))
    admin = session_mask(pol, "cursor", Identity(user="alice"), frozenset({"admins"}))
    assert not everyone & 1 and admin & 1 and everyone | 1 == admin


def test_default_policy_is_enforced_before_the_fact_where_the_kernel_can() -> None:
    plan = compile_policy(parse((REPO / "deploy/policy.yaml").read_text()))
    whens = {name: when for name, (_, when) in plan.mechanisms.items()}
    assert whens["no-drop-database"] == whens["no-drop-or-truncate-table"] == whens["no-cloud-metadata"] == "before"
    assert whens["hold-force-push"] == "before" and plan.exact & 0b111 == 0b111


def test_http_rules() -> None:
    plan = compile_policy(parse("""
version: 1
rules:
  - name: admin
    when: {kind: http, http: {method: [DELETE], path: ["/admin/*", "/exact"]}}
    action: deny
  - name: host
    when: {kind: http, http: {host: ["Secrets.Internal"]}}
    action: deny
  - name: glob-host
    when: {kind: http, http: {host: ["*.corp"]}}
    action: audit
  - name: glob-path
    when: {kind: http, http: {path: ["/v*/users"]}}
    action: deny
  - name: long-method
    when: {kind: http, http: {method: [PROPFIND]}}
    action: deny
"""))
    # a method the kernel does not read (8 letters): judged on the reconstructed request
    assert plan.http_exact == 0b00011 and plan.http_inexact == 0b11100 and plan.soft == 0b0100
    assert plan.http_methods == {fnv(b"DELETE"): 1}
    assert plan.http_prefixes == {fnv(b"/admin/"): 1} and plan.http_paths == {fnv(b"/exact"): 1}
    # and its fully qualified spelling, which servers take as the same site (red team)
    assert plan.http_hosts == {fnv(b"secrets.internal"): 2, fnv(b"secrets.internal."): 2}
    assert plan.http_any_method == 0b10 and plan.http_any_host == 0b01 and plan.http_any_path == 0b10
    assert plan.mechanisms["admin"][1] == "before" and plan.mechanisms["glob-path"][1] == "after"


def test_http_path_of_any_directory_is_a_last_segment_the_kernel_matches() -> None:
    """`*/git-receive-pack`: the kernel hashes each path's last segment (with its '/'); a '%'
    in that segment (a server may decode it to the name) makes every such rule a candidate."""
    plan = compile_policy(parse("""
version: 1
rules:
  - name: push
    when: {kind: http, http: {method: [POST], path: ["*/git-receive-pack"]}}
    action: hold
    approvers: [self]
    timeout: 5m
  - name: not-a-segment
    when: {kind: http, http: {path: ["*/a/b", "*x"]}}
    action: deny
"""))
    assert plan.http_exact == 0b01 and plan.http_inexact == 0b10
    assert plan.http_suffixes == {fnv(b"/git-receive-pack"): 1} and plan.http_suffix_rules == 0b01
    assert plan.mechanisms["push"][1] == "before" and plan.mechanisms["not-a-segment"][1] == "after"
