"""Secrets become keyed markers: the same secret gives the same marker, nothing is dropped."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
from agentwarden.core.events import Event, Process, SqlInfo
from agentwarden.daemon.mask import Masker, load_key
from hypothesis import given, settings
from hypothesis import strategies as st

KEY = b"k" * 32
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"


@pytest.fixture
def m() -> Masker:
    return Masker(KEY)


@pytest.mark.parametrize("text, secret, kind", [
    ("postgres://app:hunter2@db:5432/x", "hunter2", "url_password"),
    ("https://u:p%40ss@example.com/path", "p%40ss", "url_password"),
    ("PGPASSWORD=s3cr3t psql", "s3cr3t", "password"),
    ("curl https://api/x?access_token=abcdef123&page=2", "abcdef123", "password"),
    ("--password=pw-value", "pw-value", "password"),
    ('{"password": "js-pw", "n": 1}', "js-pw", "password"),
    ("sh -c 'deploy --token tk1 --x'", "tk1", "password"),
    ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop", "bearer"),
    ("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "aws_access_key"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "aws_secret_key"),
    ("ghp_" + "a" * 36, "ghp_" + "a" * 36, "github_token"),
    ("glpat-" + "x" * 20, "glpat-" + "x" * 20, "gitlab_token"),
    ("xoxb-1234567890-abcdef", "xoxb-1234567890-abcdef", "slack_token"),
    (f"?jwt_in_query={JWT}", JWT, "jwt"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIabc\n-----END RSA PRIVATE KEY-----",
     "-----BEGIN RSA PRIVATE KEY-----\nMIIabc\n-----END RSA PRIVATE KEY-----", "pem_private_key"),
    ("ALTER ROLE app PASSWORD 'pw''quoted'", "'pw''quoted'", "sql_password"),
    ("cache_key=Zx8Qp2Lm9Vr4Tn7Ks1Bw", "Zx8Qp2Lm9Vr4Tn7Ks1Bw", "key"),
    ("use sk-ant-api03-" + "Q" * 24 + " here", "sk-ant-api03-" + "Q" * 24, "llm_api_key"),
    ("sk-proj-" + "a1" * 12, "sk-proj-" + "a1" * 12, "llm_api_key"),
    ("AIza" + "B" * 35, "AIza" + "B" * 35, "google_api_key"),
])
def test_secret_formats(m: Masker, text: str, secret: str, kind: str) -> None:
    out = m.text(text)
    assert secret not in out
    assert m.marker(kind, secret) in out


@pytest.mark.parametrize("text", ["sort_key=date", "ls -la /tmp", "select * from users where id = 1",
                                  "author=Jane design=flat"])
def test_ordinary_text_is_kept(m: Masker, text: str) -> None:
    assert m.text(text) == text


def test_argv_rules(m: Masker) -> None:
    assert m.argv(["mysql", "-uroot", "-phunter2", "db"]) == ["mysql", "-uroot", "-p" + m.marker("password", "hunter2"),
                                                               "db"]
    assert m.argv(["sshpass", "-p", "pw1", "ssh", "h"])[2] == m.marker("password", "pw1")
    assert m.argv(["redis-cli", "-a", "pw2"])[2] == m.marker("password", "pw2")
    assert m.argv(["tool", "--token", "tk"])[2] == m.marker("password", "tk")
    assert m.argv(["curl", "-u", "bob:pw3", "http://x"])[2] == "bob:" + m.marker("password", "pw3")
    assert m.argv(["psql", "-p", "5432"]) == ["psql", "-p", "5432"]    # psql's -p is the port
    assert m.argv(["env", "API_TOKEN=t0k", "x"])[1] == "API_TOKEN=" + m.marker("password", "t0k")


def test_same_secret_same_marker_other_key_other_marker(m: Masker) -> None:
    a = m.text("postgres://u:pw@h")
    b = m.text("mysql://other:pw@elsewhere")
    assert a.split("[MASKED:")[1][:25] == b.split("[MASKED:")[1][:25]
    assert Masker(b"z" * 32).marker("password", "pw") != m.marker("password", "pw")


def test_masking_is_idempotent(m: Masker) -> None:
    once = m.text("PGPASSWORD=s3cr3t")
    assert m.text(once) == once


def test_event_stage_masks_argv_and_sql_and_keeps_the_event(m: Masker) -> None:
    ev = Event(kind="sql", ts_ns=1, host="h", process=Process(argv=["psql", "postgres://a:b@h/db"]),
               sql=SqlInfo(query="CREATE ROLE x PASSWORD 'hunter9'", error="bad password 'hunter9'"))
    out = m.event(ev)
    assert out is ev and out.kind == "sql"
    assert "hunter9" not in out.sql.query and "[MASKED:sql_password:" in out.sql.query  # type: ignore[union-attr]
    assert out.process.argv[1] == "postgres://a:" + m.marker("url_password", "b") + "@h/db"


def test_extra_patterns() -> None:
    m = Masker(KEY, [r"internal-id-(\d{6})"])
    assert m.text("see internal-id-123456") == "see internal-id-" + m.marker("custom", "123456")


def test_key_file_created_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "mask.key"
    k1 = load_key(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(k1) == 32
    assert load_key(str(path)) == k1


def test_curl_headers_and_cookies(m: Masker) -> None:
    out = m.argv(["curl", "-H", "Cookie: sid=abc", "-H", "Accept: text/plain", "-b", "s=1", "http://x"])
    assert out[2] == "Cookie:" + m.marker("header", "sid=abc")
    assert out[4] == "Accept: text/plain"
    assert out[6] == m.marker("header", "s=1")


def test_extra_header_names() -> None:
    m = Masker(KEY, extra_headers=["X-Internal-Signature"])
    out = m.headers({"x-internal-signature": "abc", "accept": "*/*", "authorization": "Basic dTpw"})
    assert out["x-internal-signature"] == m.marker("header", "abc") and out["accept"] == "*/*"
    assert out["authorization"] == m.marker("header", "Basic dTpw")


_OLD_HINT = re.compile(r"(?i)://|private key|akia|asia|gh[pousr]_|github_pat|glpat-|xox|eyj|bearer|pass|pwd|"
                       r"secret|token|key|signature|auth|credential|session|sk-|aiza")


@settings(max_examples=2000)
@given(st.text(alphabet=st.sampled_from(list("abcdeghijklmnoprstuwxyAKPSTY_:/- ")), max_size=40))
def test_the_keyword_prefilter_is_the_old_alternation(text: str) -> None:
    """The substring check that replaced one IGNORECASE regex decides exactly as it did."""
    from agentwarden.daemon.mask import _hinted

    assert _hinted(text) == bool(_OLD_HINT.search(text)), text


def test_a_tool_calls_json_arguments_are_masked_value_by_value(m: Masker) -> None:
    """In JSON text a quote is `\\"`, and a rule's value stopped at the backslash (red team)."""
    key = "sk-proj-" + "z9" * 12
    args = json.dumps({"command": f'export OPENAI_API_KEY="{key}" && mysql --password "pw-7" db'})
    out = m.json_text(args)
    assert key not in out and "pw-7" not in out and json.loads(out)["command"].startswith("export OPENAI_API_KEY=")
    assert m.json_text("not json sk-ant-" + "x" * 24) == m.text("not json sk-ant-" + "x" * 24)


def test_llm_hashes_are_keyed(m: Masker) -> None:
    import hashlib

    plain = hashlib.sha256(b"yes").hexdigest()
    assert m.keyed(plain) == m.keyed(plain) != plain and m.keyed("") == ""
    assert Masker(b"another key, 32 bytes long......").keyed(plain) != m.keyed(plain)
