"""The userspace twin of the kernel's SQL normaliser (the kernel side is exercised in test_enforce)."""

from __future__ import annotations

from agentwarden.enforce.sqlnorm import command_hash, fnv, statements
from hypothesis import given
from hypothesis import strategies as st


def texts(sql: str) -> list[str]:
    return [s.text for s in statements(sql)]


def test_normalises_case_space_and_comments() -> None:
    assert texts("drop  /* c */ table\n\tT1") == ["DROP TABLE T1"]
    assert texts("-- leading\nDrOp TABLE t1 -- trailing") == ["DROP TABLE T1"]
    assert texts("/* nested /* twice */ still */ truncate t") == ["TRUNCATE T"]


def test_splits_statements_outside_quotes() -> None:
    assert texts("select ';drop table x'; drop table y") == ["SELECT ';drop table x'", "DROP TABLE Y"]
    assert texts('select "a;b" from t;') == ['SELECT "a;b" FROM T']
    assert texts("select $$ ; drop table z $$; vacuum") == ["SELECT $$ ; drop table z $$", "VACUUM"]
    assert texts(";;  ;") == []


def test_heads_match_rule_commands() -> None:
    (s,) = statements("DROP TABLE IF EXISTS t")
    assert command_hash("drop table") in s.heads
    assert command_hash("DROP") in s.heads
    assert command_hash("drop table if exists") not in s.heads   # only three words are hashed
    (t,) = statements("drop(table)")
    assert command_hash("DROP") in t.heads and command_hash("drop table") not in t.heads


def test_same_statement_same_hash() -> None:
    a = statements("drop table t")[0].hash
    b = statements("  DROP\n TABLE   t ; ")[0].hash
    assert a == b == fnv(b"DROP TABLE T")
    assert statements("drop table u")[0].hash != a


@given(st.text(max_size=300))
def test_never_raises(sql: str) -> None:
    for s in statements(sql):
        assert s.text and not s.text.startswith(" ")   # inside an open quote a trailing space is text
