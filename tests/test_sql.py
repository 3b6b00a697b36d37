"""Statement analysis: a real parser decides the command and tables, whatever the disguise."""

from __future__ import annotations

import pytest
from agentwarden.daemon.l7 import sql
from agentwarden.daemon.l7.sql import analyze
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize("text, command, tables", [
    ("DROP TABLE t", "DROP TABLE", ("t",)),
    ('/* harmless */ dRoP\n\t TaBlE "Users"', "DROP TABLE", ("Users",)),
    ("-- note\nDROP TABLE IF EXISTS s.a, b CASCADE", "DROP TABLE", ("s.a", "b")),
    ("drop database prod", "DROP DATABASE", ()),
    ("TRUNCATE a, b", "TRUNCATE", ("a", "b")),
    ("insert into t values (1)", "INSERT", ("t",)),
    ("copy s.t from stdin", "COPY", ("s.t",)),
    ("update a set x = 1 from b", "UPDATE", ("a", "b")),
    ("delete from d using e", "DELETE", ("d", "e")),
    ("create table n (a int)", "CREATE TABLE", ("n",)),
    ("alter table q add column z int", "ALTER TABLE", ("q",)),
    ("select * from x join y.z on true", "SELECT", ("x", "y.z")),
    ("select 1 into newt", "SELECT INTO", ("newt",)),
    ("begin", "BEGIN", ()),
    ("commit", "COMMIT", ()),
    ("create role r password 'x'", "CREATE ROLE", ()),
])
def test_command_and_tables(text: str, command: str, tables: tuple[str, ...]) -> None:
    (s,) = analyze(text)
    assert (s.command, s.tables, s.parsed) == (command, tables, True)


def test_second_statement_of_a_multi_statement_text() -> None:
    parts = analyze("select 1; /* x */ DROP TABLE t; select 2")
    assert [p.command for p in parts] == ["SELECT", "DROP TABLE", "SELECT"]
    assert parts[1].text == "DROP TABLE t"


def test_unparseable_text_is_kept_and_marked() -> None:
    (s,) = analyze("DROP TABEL t")
    assert s.parsed is False and s.text == "DROP TABEL t" and s.command == "DROP TABEL"


def test_only_comments() -> None:
    (s,) = analyze("-- nothing")
    assert s.command == "" and s.parsed


@pytest.mark.parametrize("text", [
    "select 1", "  SELECT abalance FROM pgbench_accounts WHERE aid = 5  ", "select 'a b' from t", "select $$x$$",
    "insert into t values (1, 'x')", "update t set a=1 where b in (select c from d)", "drop table x", "begin",
    "select e'\\n'", "copy t from stdin", "select 1\n", "\tvacuum analyze t", "selec 1",
])
def test_one_statement_without_a_split_reads_as_with_one(text: str) -> None:
    """Text with no `;` and no comment skips libpg_query's split: the same statements come out."""
    import pglast
    from agentwarden.daemon.l7 import sql

    try:
        pieces = pglast.parser.split(text)
        slow = tuple(sql.SqlStatement(p.strip(), *sql._shape(p), True) for p in pieces)
    except Exception:
        slow = (sql.SqlStatement(text, sql._guess_command(text), (), False),)
    assert sql.analyze.__wrapped__(text) == slow


@given(st.one_of(st.text(max_size=40),
                 st.sampled_from(["SELECT 1", "select a from t where b = 5", "DROP TABLE x; ", "DO $$ begin end $$",
                                  "sel ect", "SELECT 'é'", "COPY t FROM STDIN", "/* c */ DELETE FROM t"])))
def test_fingerprint_is_pglasts(text: str) -> None:
    """sql.fingerprint calls libpg_query without letting go of the GIL: the same value as
    pglast's own call, and the same refusal of what does not parse."""
    import pglast

    try:
        want: object = pglast.parser.fingerprint(text)
    except Exception as e:  # noqa: BLE001 - whatever pglast raises, ours must raise as well
        want = type(e)
    try:
        got: object = sql.fingerprint(text)
    except Exception as e:  # noqa: BLE001
        got = type(e)
    assert got == want
    assert sql.fingerprint is not pglast.parser.fingerprint    # the library exports the symbols here
