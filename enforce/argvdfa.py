"""Compile exec.argv regexes into one DFA the kernel runs over the command line.

A decision the kernel cannot make needs the process stopped until userspace makes it,
and that stop is visible: a job-control shell prints "Stopped" and moves the command to
the background, sudo and su stop themselves.  So argv conditions are decided in the
kernel wherever the regex allows: this module turns `rx.search(" ".join(argv))`, with the
policy's flags (IGNORECASE, DOTALL), into a byte DFA with one absorbing accepting state.

Parsed by Python's own regex parser, so the syntax is exactly the policy's.  Supported:
literals, classes (\\s \\w \\d and their negations, ranges, negated sets), `.`, groups,
alternation, greedy and lazy repeats, `^` `$` `\\A` `\\Z` `\\b` `\\B`, case folding
turned on or off in a group (`(?-i:...)`), and `(?x)`.  Anything else
(lookaround, back references, conditionals) raises Unsupported, and the rule is decided
in userspace.  Word boundaries are exact: a DFA state remembers whether the previous byte
was a word byte.  Over ASCII text the DFA and `re` agree exactly (a property test says
so); over other text they may not (`.` is one character but several bytes, `\\b`, `\\s`
and case folding are Unicode-aware in `re`), so a command line with any byte >= 0x80 is
left to userspace by the kernel.

Argument boundaries: the text is the arguments joined by NUL (the bytes exec copied).  A
pattern sees a boundary exactly as it sees a space (a literal space, `\\s`, `.`, `[^x]` all match
both), so `rx.search(" ".join(argv))` is still the meaning of every pattern that does not name
NUL.  A pattern may name it: `\\x00` matches a boundary and never a space inside an argument,
which `" ".join` cannot tell apart (`git push "origin main"` is one argument, a remote whose
name has a space).  Such a pattern is matched by this DFA in userspace too, byte for byte
(`boundary_aware`, `Dfa.run(..., exact=True)`), so the kernel and Python cannot disagree.

Tables: state 0 rejects for good, state 1 accepts for good; every rule's DFA starts at
its own state.  `step(state, byte)`, then `step(state, END)` once at the end of the text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from re import _constants as C  # type: ignore[attr-defined]  # 3.11+: the parser re itself uses
from re import _parser as P  # type: ignore[attr-defined]
from typing import Any, Generic, TypeVar

END = 256           # the symbol fed once after the last byte
SYMBOLS = 257
REJECT, ACCEPT = 0, 1
MAX_REPEAT_EXPAND = 64


class Unsupported(ValueError):
    """The regex cannot become a DFA (or would be too large)."""


def _is_word(b: int) -> bool:
    return b >= 0x80 or b == 0x5F or 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A


BOUNDARY = 0x00     # between two arguments
_SPACE = frozenset(b" \t\n\r\f\v\x1c\x1d\x1e\x1f\x00")   # str.isspace() over ASCII, and the boundary
_DIGIT = frozenset(range(0x30, 0x3A))
_WORD = frozenset(b for b in range(256) if _is_word(b))
_ALL = frozenset(range(256))
_CATEGORY = {
    C.CATEGORY_DIGIT: _DIGIT, C.CATEGORY_NOT_DIGIT: _ALL - _DIGIT,
    C.CATEGORY_SPACE: _SPACE, C.CATEGORY_NOT_SPACE: _ALL - _SPACE,
    C.CATEGORY_WORD: _WORD, C.CATEGORY_NOT_WORD: _ALL - _WORD,
}


# ---- NFA (Thompson) -------------------------------------------------------------------

@dataclass
class _Nfa:
    # per state: byte edges (set of bytes, target) and epsilon edges (condition, target);
    # conditions: "" always, "^" start of text, "$" end of text, "b" boundary, "B" not boundary
    edges: list[list[tuple[frozenset[int], int]]] = field(default_factory=list)
    eps: list[list[tuple[str, int]]] = field(default_factory=list)

    def new(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1


def _fold(chars: set[int]) -> set[int]:
    out = set(chars)
    for c in chars:
        if 0x41 <= c <= 0x5A:
            out.add(c + 32)
        elif 0x61 <= c <= 0x7A:
            out.add(c - 32)
    return out


def _char_bytes(code: int) -> bytes:
    return chr(code).encode()


def _with_boundary(chars: set[int]) -> set[int]:
    """What matches a space matches a boundary too (unless it is NUL itself, named)."""
    return chars | {BOUNDARY} if 0x20 in chars else chars


class _Builder:
    def __init__(self, flags: int) -> None:
        self.nfa = _Nfa()
        self.icase = bool(flags & re.I)
        self.dotall = bool(flags & re.S)

    def literal_seq(self, code: int, start: int) -> int:
        """A character: one byte edge per UTF-8 byte.  Returns the end state."""
        cur = start
        for b in _char_bytes(code):
            nxt = self.nfa.new()
            chars = _with_boundary(_fold({b}) if self.icase and b < 0x80 else {b})
            self.nfa.edges[cur].append((frozenset(chars), nxt))
            cur = nxt
        return cur

    def byte_set(self, chars: set[int], start: int) -> int:
        nxt = self.nfa.new()
        self.nfa.edges[start].append((frozenset(_fold(chars) if self.icase else chars), nxt))
        return nxt

    def in_set(self, items: list[tuple[Any, Any]]) -> set[int]:
        negate = False
        out: set[int] = set()
        for op, av in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                code = int(av)
                if code >= 0x80:
                    raise Unsupported("non-ASCII character in a class")
                out |= _with_boundary({code})
            elif op is C.RANGE:
                lo, hi = av
                if hi >= 0x80:
                    raise Unsupported("non-ASCII range in a class")
                out |= _with_boundary(set(range(lo, hi + 1)))
            elif op is C.CATEGORY:
                if av not in _CATEGORY:
                    raise Unsupported(f"class category {av}")
                out.update(_CATEGORY[av])
            else:
                raise Unsupported(f"class item {op}")
        if self.icase:
            out = _fold(out)
        return set(_ALL - out) if negate else out

    def seq(self, items: Any, start: int) -> int:
        cur = start
        for op, av in items:
            cur = self.item(op, av, cur)
        return cur

    def item(self, op: Any, av: Any, start: int) -> int:
        nfa = self.nfa
        if op is C.LITERAL:
            return self.literal_seq(int(av), start)
        if op is C.NOT_LITERAL:
            code = int(av)
            if code >= 0x80:
                raise Unsupported("non-ASCII negated literal")
            return self.byte_set(set(_ALL - _with_boundary(_fold({code}) if self.icase else {code})), start)
        if op is C.ANY:
            return self.byte_set(set(_ALL) if self.dotall else set(_ALL - {0x0A}), start)
        if op is C.IN:
            chars = self.in_set(list(av))
            nxt = nfa.new()
            nfa.edges[start].append((frozenset(chars), nxt))
            return nxt
        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if (add_flags | del_flags) & ~(re.I | re.X):   # x only changes how the pattern is read
                raise Unsupported("inline flags other than i and x inside a group")
            # (?i:...) / (?-i:...): case folding on or off inside the group, as in `re`
            saved, self.icase = self.icase, bool(add_flags & re.I) or (self.icase and not del_flags & re.I)
            try:
                return self.seq(sub, start)
            finally:
                self.icase = saved
        if op is C.BRANCH:
            _, branches = av
            end = nfa.new()
            for b in branches:
                s = nfa.new()
                nfa.eps[start].append(("", s))
                e = self.seq(b, s)
                nfa.eps[e].append(("", end))
            return end
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            # a search only asks whether some match exists: greed does not change the answer
            cur = start
            for _ in range(lo):
                if lo > MAX_REPEAT_EXPAND:
                    raise Unsupported("repeat count too large")
                cur = self.seq(sub, cur)
            if hi is C.MAXREPEAT:
                loop = nfa.new()
                nfa.eps[cur].append(("", loop))
                body_end = self.seq(sub, loop)
                nfa.eps[body_end].append(("", loop))
                return loop
            if hi - lo > MAX_REPEAT_EXPAND:
                raise Unsupported("repeat count too large")
            end = nfa.new()
            nfa.eps[cur].append(("", end))
            for _ in range(hi - lo):
                cur = self.seq(sub, cur)
                nfa.eps[cur].append(("", end))
            return end
        if op is C.AT:
            cond = {C.AT_BEGINNING: "^", C.AT_BEGINNING_STRING: "^", C.AT_END: "$", C.AT_END_STRING: "$",
                    C.AT_BOUNDARY: "b", C.AT_NON_BOUNDARY: "B"}.get(av)
            if cond is None:
                raise Unsupported(f"assertion {av}")
            nxt = nfa.new()
            nfa.eps[start].append((cond, nxt))
            return nxt
        raise Unsupported(f"{op} is not supported in the kernel")


# ---- subset construction ---------------------------------------------------------------

# The byte before the current position: 0 none (start of text), 1 a non-word byte, 2 a word byte.
_START, _NONWORD, _WORDPREV = 0, 1, 2


@dataclass
class Dfa:
    """Transition tables of every compiled rule, and each rule's start state."""

    table: list[list[int]] = field(default_factory=lambda: [[REJECT] * SYMBOLS, [ACCEPT] * SYMBOLS])
    starts: dict[int, int] = field(default_factory=dict)      # rule index -> start state

    @property
    def states(self) -> int:
        return len(self.table)

    def run(self, rule: int, text: bytes, exact: bool = False) -> bool | None:
        """What the kernel computes: does the rule's argv condition hold?  None: the kernel
        leaves it to userspace (non-ASCII text).  `exact`: the answer over any bytes (a
        boundary-aware pattern means what this DFA does, in userspace too)."""
        if not exact and any(b >= 0x80 for b in text):
            return None
        s = self.starts[rule]
        for b in text:
            s = self.table[s][b]
        return self.table[s][END] == ACCEPT


def _closure(nfa: _Nfa, states: frozenset[int], prev: int, nxt: int) -> frozenset[int]:
    """Epsilon closure given the previous context and the next symbol (a byte or END)."""
    at_start = prev == _START
    at_end = nxt == END
    prev_word = prev == _WORDPREV
    next_word = not at_end and _is_word(nxt)
    seen = set(states)
    stack = list(states)
    while stack:
        s = stack.pop()
        for cond, t in nfa.eps[s]:
            ok = (cond == "" or (cond == "^" and at_start) or (cond == "$" and at_end)
                  or (cond == "b" and prev_word != next_word) or (cond == "B" and prev_word == next_word))
            if ok and t not in seen:
                seen.add(t)
                stack.append(t)
    return frozenset(seen)


def compile_rule(dfa: Dfa, rule: int, patterns: list[re.Pattern[str]], max_states: int,
                 unless: list[re.Pattern[str]] | tuple[re.Pattern[str], ...] = ()) -> None:
    """Add one rule (its regexes, any of which may match; none: any text) to the tables,
    excluding text any `unless` regex matches.  Raises Unsupported."""
    if unless:
        _compile_product(dfa, rule, patterns, list(unless), max_states)
        return
    if not patterns:
        patterns = [re.compile("")]
    b = _Builder(patterns[0].flags if patterns else 0)
    start = b.nfa.new()
    accept = b.nfa.new()
    # unanchored search: a loop on any byte before the match may begin
    for rx in patterns:
        if rx.flags & ~(re.I | re.S | re.U | re.X):   # VERBOSE only changes how the pattern is read
            raise Unsupported("flags other than IGNORECASE, DOTALL and VERBOSE")
        if bool(rx.flags & re.I) != b.icase or bool(rx.flags & re.S) != b.dotall:
            raise Unsupported("mixed flags in one rule")
        s = b.nfa.new()
        b.nfa.eps[start].append(("", s))
        e = b.seq(P.parse(rx.pattern, rx.flags), s)
        b.nfa.eps[e].append(("", accept))
    nfa = b.nfa
    new: _NewStates[tuple[frozenset[int], int]] = _NewStates(dfa, max_states)
    state_of = new.state

    # bytes no edge set and no word boundary tells apart move alike: one closure per class
    # (about 20 classes for the default policy, not 256; 5x faster to compile)
    classes: dict[tuple[bool, ...], list[int]] = {}
    sets = list({chars for out in nfa.edges for chars, _t in out})
    for sym in range(256):
        classes.setdefault((_is_word(sym), *(sym in chars for chars in sets)), []).append(sym)
    groups = [*classes.values(), [END]]

    first = state_of((frozenset({start}), _START))
    while new.work:
        states, prev = new.work.pop()
        row = new.row((states, prev))
        for group in groups:
            sym = group[0]
            closed = _closure(nfa, states, prev, sym)
            if accept in closed:
                nxt = ACCEPT
            elif sym == END:
                nxt = REJECT
            else:
                moved = {t for s in closed for chars, t in nfa.edges[s] if sym in chars}
                # the search may (re)start at every position
                moved.add(start)
                nxt = state_of((frozenset(moved), _WORDPREV if _is_word(sym) else _NONWORD))
            for member in group:
                row[member] = nxt
    dfa.table.extend(new.rows)
    dfa.starts[rule] = first


K = TypeVar("K", bound=Hashable)


class _NewStates(Generic[K]):
    """The states a construction adds to a Dfa, by key, numbered after the states it has."""

    def __init__(self, dfa: Dfa, max_states: int) -> None:
        self.base, self.max_states = dfa.states, max_states
        self.ids: dict[K, int] = {}
        self.rows: list[list[int]] = []
        self.work: list[K] = []      # states whose row is still to be filled

    def state(self, key: K) -> int:
        if key not in self.ids:
            if self.base + len(self.rows) >= self.max_states:
                raise Unsupported(f"more than {self.max_states} DFA states in all")
            self.ids[key] = self.base + len(self.rows)
            self.rows.append([REJECT] * SYMBOLS)
            self.work.append(key)
        return self.ids[key]

    def row(self, key: K) -> list[int]:
        return self.rows[self.ids[key] - self.base]


def _compile_product(dfa: Dfa, rule: int, patterns: list[re.Pattern[str]], unless: list[re.Pattern[str]],
                     max_states: int) -> None:
    """The product of two DFAs: some pattern matches and no `unless` pattern does.

    Both have absorbing REJECT and ACCEPT states and answer at END, so the product does
    too: once `unless` has matched the text is rejected for good, once the patterns have
    matched and `unless` never can, it is accepted for good; otherwise END decides.  The
    kernel runs it like any other rule's DFA (guard.bpf.c exec_finish)."""
    a, b = Dfa(), Dfa()
    compile_rule(a, 0, patterns, max_states)
    compile_rule(b, 0, unless, max_states)
    new: _NewStates[tuple[int, int]] = _NewStates(dfa, max_states)

    def state_of(sa: int, sb: int) -> int:
        if sb == ACCEPT or sa == REJECT:
            return REJECT
        if sa == ACCEPT and sb == REJECT:
            return ACCEPT
        return new.state((sa, sb))

    # bytes both tables move alike form one class (a few dozen, not 256)
    classes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for sym in range(256):
        key = (tuple(r[sym] for r in a.table), tuple(r[sym] for r in b.table))
        classes.setdefault(key, []).append(sym)
    groups = list(classes.values())
    first = state_of(a.starts[0], b.starts[0])
    while new.work:
        sa, sb = new.work.pop()
        row = new.row((sa, sb))
        for group in groups:
            nxt = state_of(a.table[sa][group[0]], b.table[sb][group[0]])
            for member in group:
                row[member] = nxt
        row[END] = ACCEPT if a.table[sa][END] == ACCEPT and b.table[sb][END] != ACCEPT else REJECT
    dfa.table.extend(new.rows)
    dfa.starts[rule] = first


def argv_text(argv: list[str]) -> bytes:
    """The text the kernel reads: the arguments joined by NUL, as exec copied them."""
    return b"\0".join(a.encode(errors="surrogateescape") for a in argv)


def boundary_aware(rx: re.Pattern[str]) -> bool:
    """Does the pattern name the argument boundary (NUL)?  Then `re` over `" ".join(argv)`
    cannot mean it, and the DFA is its meaning on both sides."""
    def walk(items: Any) -> bool:
        for op, av in items:
            if op in (C.LITERAL, C.NOT_LITERAL) and av == BOUNDARY:
                return True
            if op is C.RANGE and av[0] == BOUNDARY:
                return True
            if op is C.IN and walk(av):
                return True
            if op is C.SUBPATTERN and walk(av[-1]):
                return True
            if op is C.BRANCH and any(walk(b) for b in av[1]):
                return True
            if op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", None)) and walk(av[-1]):
                return True
            if op in (C.ASSERT, C.ASSERT_NOT) and walk(av[-1]):
                return True
        return False
    return walk(P.parse(rx.pattern, rx.flags))


def rule_dfa(patterns: list[re.Pattern[str]], max_states: int = 4096,
             unless: list[re.Pattern[str]] | tuple[re.Pattern[str], ...] = ()) -> Dfa:
    """One rule's patterns (less what `unless` matches) as a DFA of their own (rule 0), for
    userspace matching."""
    return _rule_dfa(tuple((rx.pattern, rx.flags) for rx in patterns), max_states,
                     tuple((rx.pattern, rx.flags) for rx in unless))


@functools.lru_cache(maxsize=64)
def _rule_dfa(patterns: tuple[tuple[str, int], ...], max_states: int,
              unless: tuple[tuple[str, int], ...] = ()) -> Dfa:
    # a policy is parsed again on every reload, `policy check` and test: its DFAs are not
    dfa = Dfa()
    compile_rule(dfa, 0, [re.compile(p, f) for p, f in patterns], max_states,
                 [re.compile(p, f) for p, f in unless])
    return dfa
