"""What a SQL text does, from PostgreSQL's own parser (pglast = libpg_query).

Comments, case, quoting and several statements in one text cannot hide a
`DROP TABLE` from a real parser; text it cannot parse is still returned, whole,
marked `parsed=False`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pglast
from pglast import ast, enums

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


def _command(stmt: Any) -> str:
    name = type(stmt).__name__
    if name == "DropStmt":
        kind = enums.ObjectType(stmt.removeType).name.removeprefix("OBJECT_").replace("_", " ")
        return f"DROP {kind}"
    if name == "TransactionStmt":
        return _TRANSACTION.get(enums.TransactionStmtKind(stmt.kind).name, "TRANSACTION")
    if name == "SelectStmt" and getattr(stmt, "intoClause", None) is not None:
        return "SELECT INTO"
    if name in _COMMANDS:
        return _COMMANDS[name]
    return _CAMEL.sub(" ", name.removesuffix("Stmt")).upper()


def _tables(stmt: Any) -> tuple[str, ...]:
    found: list[str] = []

    def add(name: str) -> None:
        if name not in found:
            found.append(name)

    def walk(node: object) -> None:
        if isinstance(node, ast.RangeVar):
            add(".".join(p for p in (node.schemaname, node.relname) if p))
        if isinstance(node, ast.Node):
            for slot in node.__slots__:  # type: ignore[attr-defined]
                walk(getattr(node, slot, None))
        elif isinstance(node, (tuple, list)):
            for item in node:
                walk(item)

    if type(stmt).__name__ == "DropStmt" and enums.ObjectType(stmt.removeType).name in (
        "OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE",
        "OBJECT_INDEX"):
        for obj in stmt.objects or ():
            parts = obj if isinstance(obj, (tuple, list)) else (obj,)
            add(".".join(str(getattr(p, "sval", p)) for p in parts))
    walk(stmt)
    return tuple(found)


@lru_cache(maxsize=4096)
def analyze(text: str) -> tuple[SqlStatement, ...]:
    """Split a query string into statements, each with its command and tables."""
    try:
        raws = pglast.parser.parse_sql(text)
    except Exception:   # pglast raises ParseError and others for what Postgres would reject
        return (SqlStatement(text, _guess_command(text), (), False),)
    out: list[SqlStatement] = []
    data = text.encode()
    for raw in raws:
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(data)
        piece = data[start:end].decode(errors="replace").strip()
        stmt = raw.stmt
        out.append(SqlStatement(piece, _command(stmt), _tables(stmt), True))
    if not out:   # only comments or whitespace: the server answers EmptyQueryResponse
        return (SqlStatement(text, "", (), True),)
    return tuple(out)


def _guess_command(text: str) -> str:
    """First words of text that does not parse, with comments removed: a hint, not a verdict."""
    bare = re.sub(r"--[^\n]*|/\*.*?\*/", " ", text, flags=re.S).split()
    return " ".join(bare[:2]).upper() if bare else ""
