"""What a SQL text does, from PostgreSQL's own parser (pglast = libpg_query).

Comments, case, quoting and several statements in one text cannot hide a
`DROP TABLE` from a real parser; text it cannot parse is still returned, whole,
marked `parsed=False`.
"""

from __future__ import annotations

import ctypes as ct
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pglast

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")

# node class -> command, where splitting the class name would not give the tag users know
_COMMANDS = {
    "CreateStmt": "CREATE TABLE",
    "CreateTableAsStmt": "CREATE TABLE AS",
    "IndexStmt": "CREATE INDEX",
    "ViewStmt": "CREATE VIEW",
    "CreateRoleStmt": "CREATE ROLE",
    "AlterRoleStmt": "ALTER ROLE",
    "DropRoleStmt": "DROP ROLE",
    "CreatedbStmt": "CREATE DATABASE",
    "DropdbStmt": "DROP DATABASE",
    "AlterTableStmt": "ALTER TABLE",
    "RenameStmt": "ALTER",
    "CopyStmt": "COPY",
    "VariableSetStmt": "SET",
    "VariableShowStmt": "SHOW",
    "ExplainStmt": "EXPLAIN",
    "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE",
    "DeallocateStmt": "DEALLOCATE",
    "GrantStmt": "GRANT",
    "GrantRoleStmt": "GRANT",
    "DoStmt": "DO",
    "CallStmt": "CALL",
    "VacuumStmt": "VACUUM",
    "LockStmt": "LOCK TABLE",
    "DeclareCursorStmt": "DECLARE CURSOR",
    "FetchStmt": "FETCH",
    "ClosePortalStmt": "CLOSE",
    "CreateSchemaStmt": "CREATE SCHEMA",
    "CreateFunctionStmt": "CREATE FUNCTION",
    "CreateTrigStmt": "CREATE TRIGGER",
    "CreateEventTrigStmt": "CREATE EVENT TRIGGER",
    "RuleStmt": "CREATE RULE",
    "CreateSeqStmt": "CREATE SEQUENCE",
    "CreateExtensionStmt": "CREATE EXTENSION",
    "TruncateStmt": "TRUNCATE",
    "MergeStmt": "MERGE",
}

_TRANSACTION = {
    "TRANS_STMT_BEGIN": "BEGIN", "TRANS_STMT_START": "BEGIN", "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK", "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE", "TRANS_STMT_ROLLBACK_TO": "ROLLBACK",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION", "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}


@dataclass(frozen=True)
class SqlStatement:
    text: str
    command: str
    tables: tuple[str, ...]
    parsed: bool


def _command(name: str, node: dict[str, Any]) -> str:
    if name == "DropStmt":
        kind = str(node.get("removeType", "")).removeprefix("OBJECT_").replace("_", " ")
        return f"DROP {kind}"
    if name == "TransactionStmt":
        return _TRANSACTION.get(str(node.get("kind", "TRANS_STMT_BEGIN")), "TRANSACTION")
    if name == "SelectStmt" and "intoClause" in node:
        return "SELECT INTO"
    if name == "CreateFunctionStmt" and node.get("is_procedure"):
        return "CREATE PROCEDURE"
    if name == "CopyStmt" and node.get("is_program"):
        return "COPY / COPY PROGRAM"   # matches COPY rules, and is opaque (policy.OPAQUE_SQL)
    if name == "PrepareStmt" and isinstance(node.get("query"), dict):
        ((inner, inner_node),) = node["query"].items()
        return f"PREPARE / {_command(inner, inner_node)}"
    if name in _COMMANDS:
        return _COMMANDS[name]
    return _CAMEL.sub(" ", name.removesuffix("Stmt")).upper()


_DROPPED_RELATIONS = {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE",
                      "OBJECT_SEQUENCE", "OBJECT_INDEX"}


def _tables(name: str, node: dict[str, Any]) -> tuple[str, ...]:
    found: list[str] = []

    def add(table: str) -> None:
        if table not in found:
            found.append(table)

    if name == "DropStmt" and node.get("removeType") in _DROPPED_RELATIONS:
        for obj in node.get("objects", ()):
            items = obj.get("List", {}).get("items", [obj]) if isinstance(obj, dict) else [obj]
            add(".".join(str(i.get("String", {}).get("sval", "")) for i in items if isinstance(i, dict)))

    stack: list[Any] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            # a RangeVar: wrapped as {"RangeVar": {...}} in lists, bare in typed fields like "relation"
            if "relname" in item:
                add(".".join(p for p in (item.get("schemaname"), item.get("relname")) if p))
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return tuple(found)


# normalized text -> (command, tables).  The key is the statement with its constants replaced
# by $n and nothing else changed: a fingerprint would do for most statements, but libpg_query's
# leaves schema names out, so DELETE FROM public.users, read first, gave DELETE FROM prod.users
# the tables of the first (red team): a `tables: [prod.*]` rule did not hold, the trail named the
# wrong table.
_SHAPES: dict[str, tuple[str, tuple[str, ...]]] = {}
_SHAPES_MAX = 20_000
# statements up to this long are normalized holding the GIL; longer ones let go of it, so that a
# megabyte of SQL (libpg_query: about 0.1 s a MB) does not stop the control socket's thread
GIL_HELD_MAX = 4096


class _PgQueryError(ct.Structure):       # libpg_query's pg_query.h
    _fields_ = [("message", ct.c_char_p), ("funcname", ct.c_char_p), ("filename", ct.c_char_p),
                ("lineno", ct.c_int), ("cursorpos", ct.c_int), ("context", ct.c_char_p)]


class _NormalizeResult(ct.Structure):
    _fields_ = [("normalized_query", ct.c_void_p), ("error", ct.POINTER(_PgQueryError))]


def _normalize_holding_gil() -> Any:
    """pglast's normalize, called without letting go of the GIL for short statements.

    pglast releases the GIL around libpg_query's few µs: the daemon's capture thread then waits
    to get it back behind the store writer, which keeps it for a whole switch interval, and
    under pgbench -S that wait, once a statement, was most of the capture thread's time (its
    profile: idle in this call; README, Daemon CPU per statement).  The same C function of
    the same library, through ctypes.PyDLL, which keeps the GIL; pglast's own call for long
    statements, or where the library does not export it."""
    try:
        lib = ct.PyDLL(pglast.parser.__file__)
        call, free = lib.pg_query_normalize, lib.pg_query_free_normalize_result
    except (OSError, AttributeError):
        return pglast.parser.normalize
    call.argtypes, call.restype = [ct.c_char_p], _NormalizeResult
    free.argtypes, free.restype = [_NormalizeResult], None
    released = pglast.parser.normalize

    def normalize(query: str) -> str:
        if len(query) > GIL_HELD_MAX:
            return released(query)
        result = call(query.encode("utf-8"))
        try:
            if result.error:
                message = result.error.contents.message or b""
                raise pglast.parser.ParseError(message.decode("utf-8", "replace"))
            return ct.string_at(result.normalized_query).decode("utf-8")
        finally:
            free(result)

    return normalize


normalize = _normalize_holding_gil()


def _shape(piece: str) -> tuple[str, tuple[str, ...]]:
    """Command and tables of one statement, cached by its normalized text: statements that
    differ only in constants (most of what a client sends) are read once."""
    key = normalize(piece)
    hit = _SHAPES.get(key)
    if hit is None:
        ((name, node),) = json.loads(pglast.parser.parse_sql_json(piece))["stmts"][0]["stmt"].items()
        hit = (_command(name, node), _tables(name, node))
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()
        _SHAPES[key] = hit
    return hit


@lru_cache(maxsize=4096)
def analyze(text: str) -> tuple[SqlStatement, ...]:
    """Split a query string into statements, each with its command and tables.

    Everything here is libpg_query (C): split, normalize, and JSON for what the
    shape cache has not seen; this runs for every statement an agent sends.
    """
    try:
        # one statement without `;` or comments (most of what clients send): no split needed
        plain = text.strip() and ";" not in text and "--" not in text and "/*" not in text
        pieces = [text] if plain else pglast.parser.split(text)
        out = tuple(SqlStatement(piece.strip(), *_shape(piece), True) for piece in pieces)
    except Exception:   # pglast raises ParseError and others for what Postgres would reject
        return (SqlStatement(text, _guess_command(text), (), False),)
    if not out:   # only comments or whitespace: the server answers EmptyQueryResponse
        return (SqlStatement(text, "", (), True),)
    return out


def _guess_command(text: str) -> str:
    """First words of text that does not parse, with comments removed: a hint, not a verdict."""
    bare = re.sub(r"--[^\n]*|/\*.*?\*/", " ", text, flags=re.S).split()
    return " ".join(bare[:2]).upper() if bare else ""
