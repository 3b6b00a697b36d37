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
def test_normalize_is_pglasts(text: str) -> None:
    """sql.normalize calls libpg_query without letting go of the GIL: the same text as pglast's
    own call, and the same refusal of what does not parse."""
    import pglast

    try:
        want: object = pglast.parser.normalize(text)
    except Exception as e:  # noqa: BLE001 - whatever pglast raises, ours must raise as well
        want = type(e)
    try:
        got: object = sql.normalize(text)
    except Exception as e:  # noqa: BLE001
        got = type(e)
    assert got == want
    assert sql.normalize is not pglast.parser.normalize    # the library exports the symbols here


_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)


@given(first=st.tuples(_NAME, _NAME), second=st.tuples(_NAME, _NAME),
       verb=st.sampled_from(["DELETE FROM {t} WHERE id = {n}", "UPDATE {t} SET a = {n}",
                             "INSERT INTO {t} VALUES ({n})", "SELECT * FROM {t} LIMIT {n}", "TRUNCATE {t}",
                             "DROP TABLE {t}"]))
def test_the_shape_cache_keeps_schemas_and_names_apart(first: tuple[str, str], second: tuple[str, str],
                                                        verb: str) -> None:
    """Red team: the shape cache was keyed on libpg_query's fingerprint, which leaves schema names
    out: DELETE FROM public.users, read first, gave DELETE FROM prod.users the table public.users,
    and a rule on prod.* did not hold.  Each statement gets its own tables, whatever came before."""
    a, b = ".".join(first), ".".join(second)
    assert analyze(verb.format(t=a, n=1))[0].tables == (a,)
    assert analyze(verb.format(t=b, n=2))[0].tables == (b,)
    assert analyze(verb.format(t=a, n=3))[0].tables == (a,)


def test_a_long_statement_is_read_the_same() -> None:
    """Statements past GIL_HELD_MAX take pglast's own call (it lets go of the GIL)."""
    big = "SELECT * FROM prod.t WHERE a IN (" + ",".join(str(i) for i in range(3000)) + ")"
    assert len(big) > sql.GIL_HELD_MAX
    (st_,) = analyze(big)
    assert st_.command == "SELECT" and st_.tables == ("prod.t",)
