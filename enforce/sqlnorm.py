"""The in-kernel SQL matcher's normalisation, byte for byte, in Python.

guard.bpf.c cannot parse SQL; it normalises each statement (comments and
whitespace runs become one space, words outside quotes are upper-cased, `;`
splits statements) and hashes it with FNV-1a.  Userspace must produce the same
hashes: to program command prefixes into `sql_cmds`, and to approve one exact
statement in `sql_allow`.  Keep this file and scan_chunk() in guard.bpf.c in step
(tests/test_sqlnorm.py checks both against the same cases).
"""

from __future__ import annotations

from dataclasses import dataclass

FNV_OFF = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1
_SPACE = frozenset(b" \t\n\r\f\v")


def fnv(data: bytes, h: int = FNV_OFF) -> int:
    for c in data:
        h = ((h ^ c) * FNV_PRIME) & MASK64
    return h


def command_hash(command: str) -> int:
    """Hash of a rule's command ("drop  table" -> "DROP TABLE"), as the kernel hashes a statement's head."""
    return fnv(" ".join(command.upper().split()).encode())


def _word(c: int) -> bool:
    return (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c == 95 or c >= 0x80


@dataclass(frozen=True)
class Statement:
    text: str          # normalised
    hash: int
    heads: tuple[int, ...]   # hashes of the first one, two and three words, while they are all words


def statements(sql: str | bytes) -> list[Statement]:
    """Split and normalise like the kernel does (one Query's text)."""
    b = sql.encode() if isinstance(sql, str) else sql
    out: list[Statement] = []
    buf = bytearray()
    heads: list[int] = []
    st = depth = 0
    head, in_word, pend, skip, words = True, False, False, False, 0

    def end_word() -> None:
        nonlocal in_word, words
        if in_word:
            in_word = False
            words += 1
            if head and words <= 3:
                heads.append(fnv(bytes(buf)))

    def finish() -> None:
        nonlocal head, pend, words
        end_word()
        if buf:
            out.append(Statement(buf.decode("utf-8", "replace"), fnv(bytes(buf)), tuple(heads)))
        buf.clear()
        heads.clear()
        head, pend, words = True, False, 0

    for i, c in enumerate(b):
        n = b[i + 1] if i + 1 < len(b) else 0
        if c == 0:
            break
        if skip:
            skip = False
            continue
        if st == 0:
            # `$` continues an identifier (x$$ is a name, as in PostgreSQL's lexer): no dollar quote
            w = _word(c) or (c == 36 and in_word)
            if not w:
                end_word()
            if c == 59:                                   # ;
                finish()
            elif c in _SPACE:
                pend = bool(buf)
            elif (c == 45 and n == 45) or (c == 47 and n == 42):   # -- or /*
                pend = bool(buf)
                st, depth, skip = (3 if c == 45 else 4), 1, True
            else:
                if not w:
                    head = False
                if pend:
                    buf.append(32)
                    pend = False
                in_word = in_word or w
                buf.append(c - 32 if 97 <= c <= 122 else c)
                if c == 39:
                    st = 1
                elif c == 34:
                    st = 2
                elif c == 36 and n == 36 and not w:
                    st, skip = 5, True
                    buf.append(36)
        elif st in (1, 2, 5):
            buf.append(c)
            if (st == 1 and c == 39) or (st == 2 and c == 34):
                st = 0
            elif st == 5 and c == 36 and n == 36:
                buf.append(36)
                st, skip = 0, True
        elif st == 3:
            if c == 10:
                st = 0
        elif st == 4:
            if c == 42 and n == 47:
                skip = True
                depth -= 1
                if depth == 0:
                    st = 0
            elif c == 47 and n == 42:
                depth += 1
                skip = True
    finish()
    return out
