"""The kernel's argv DFAs (enforce/argvdfa.py) answer exactly as Python's re does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from agentwarden.enforce import argvdfa
from agentwarden.enforce.policy import parse
from hypothesis import given, settings
from hypothesis import strategies as st

DEFAULT_POLICY = Path(__file__).parent.parent.joinpath("deploy", "policy.yaml").read_text()
PATTERNS = [r"\bpush\b.*(--force|-f\b)", r"\bkubectl\b.*\bdelete\b", r"\s(-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)(\s|$)",
            r"^rm\b", r"a{2,5}b?$", r"[^a-c]x\B", r"\Adenied-|x\Z", r"(?:git|hg)\s+push\s+\S*\+", r".", r""]
WORDS = ["push", "--force", "-f", "-rf", "delete", "kubectl", "rm", "--recursive", "+main", "a", "aab", "x",
         "denied-", "git", " ", "\t", "-", "/", "é", "P", "Push"]


def compiled(patterns: list[str]) -> argvdfa.Dfa:
    dfa = argvdfa.Dfa()
    for i, p in enumerate(patterns):
        argvdfa.compile_rule(dfa, i, [re.compile(p, re.I | re.S)], 8192)
    return dfa


DFA = compiled(PATTERNS)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=3), max_size=8))
def test_dfa_agrees_with_re(parts: list[str]) -> None:
    text = "".join(parts)
    for i, p in enumerate(PATTERNS):
        got = DFA.run(i, text.encode())
        if text.isascii():   # NUL is the argument boundary: to a pattern not naming it, a space
            assert got == bool(re.compile(p, re.I | re.S).search(text.replace("\0", " "))), (p, text)
        else:
            assert got is None, text    # the kernel leaves non-ASCII command lines to userspace


def test_rule_with_several_regexes_matches_any() -> None:
    dfa = argvdfa.Dfa()
    argvdfa.compile_rule(dfa, 0, [re.compile(r"\bdelete\b", re.I | re.S), re.compile(r"destroy", re.I | re.S)], 512)
    assert dfa.run(0, b"kubectl delete pod") and dfa.run(0, b"terraform destroy") and not dfa.run(0, b"ls")


@pytest.mark.parametrize("pattern", [r"(?=x)", r"(a)\1", r"(?<!a)b", r"(a)?(?(1)b|c)"])
def test_what_a_dfa_cannot_do_is_refused(pattern: str) -> None:
    with pytest.raises(argvdfa.Unsupported):
        argvdfa.compile_rule(argvdfa.Dfa(), 0, [re.compile(pattern, re.I | re.S)], 512)


def test_state_limit_is_enforced() -> None:
    with pytest.raises(argvdfa.Unsupported):
        argvdfa.compile_rule(argvdfa.Dfa(), 0, [re.compile(r"(a|b)*a(a|b){12}", re.I | re.S)], 256)


def test_default_policy_argv_rules_are_kernel_exact() -> None:
    from agentwarden.enforce import kernel

    policy = parse(DEFAULT_POLICY, "deploy/policy.yaml")
    plan = kernel.compile_policy(policy)
    assert not plan.argv_unsupported, plan.argv_unsupported
    for i, r in enumerate(policy.rules):
        if r.kind == "exec" and not r.exec_outside_workdir and not r.exec_parent_unless:
            assert plan.exact >> i & 1, r.name


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WORDS) | st.text(alphabet=" -+abfx", max_size=3), max_size=3)
                .map("".join), min_size=1, max_size=5))
def test_the_boundary_is_a_space_to_patterns_that_do_not_name_it(argv: list[str]) -> None:
    """The kernel reads arguments joined by NUL; every pattern without \\x00 still means
    re.search over " ".join(argv), spaces inside arguments included."""
    joined = " ".join(argv)
    for i, p in enumerate(PATTERNS):
        got = DFA.run(i, argvdfa.argv_text(argv))
        if joined.isascii():
            assert got == bool(re.compile(p, re.I | re.S).search(joined)), (p, argv)


def test_a_pattern_that_names_the_boundary_tells_it_from_a_space() -> None:
    two_words = re.compile(r"\x00push\x00[^\x00]+\x00[^\x00]+$", re.I | re.S)
    assert argvdfa.boundary_aware(two_words) and not argvdfa.boundary_aware(re.compile(r"\spush\s", re.I))
    dfa = argvdfa.rule_dfa([two_words])
    assert dfa.run(0, argvdfa.argv_text(["git", "push", "origin", "main"]), exact=True)
    assert not dfa.run(0, argvdfa.argv_text(["git", "push", "origin main"]), exact=True)
    # the same bytes joined by spaces: what a pattern without \x00 sees either way
    assert argvdfa.rule_dfa([re.compile(r"push\sorigin\smain", re.I | re.S)]).run(
        0, argvdfa.argv_text(["git", "push", "origin main"]))


def test_a_boundary_pattern_the_kernel_cannot_run_is_a_policy_error() -> None:
    from agentwarden.enforce.policy import PolicyError

    bad = "version: 1\nrules:\n  - name: r\n    when: {kind: exec, exec: {argv: ['(?=a)\\x00b']}}\n    action: deny\n"
    with pytest.raises(PolicyError, match=r"when.exec.argv: a pattern that names the argument boundary"):
        parse(bad)


UNLESS = [r"\x00q(\x00|$)", r"zz$", r"(?-i:^X)"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.text(alphabet="abxqzX \x00", max_size=4), min_size=1, max_size=4),
       st.sampled_from([[], [r"a.b"], [r"^x", r"b\x00"]]))
def test_a_rule_with_exceptions_is_one_dfa_that_means_and_not(argv: list[str], patterns: list[str]) -> None:
    """argv_unless: some pattern matches (none given: any text) and no exception does, as one
    table the kernel runs like any other; each side means what it means alone."""
    pats = [re.compile(p, re.I | re.S) for p in patterns]
    unless = [re.compile(p, re.I | re.S) for p in UNLESS]
    text = argvdfa.argv_text(argv)
    want = (not pats or argvdfa.rule_dfa(pats).run(0, text, exact=True)) and \
        not any(argvdfa.rule_dfa([u]).run(0, text, exact=True) for u in unless)
    assert argvdfa.rule_dfa(pats, unless=unless).run(0, text, exact=True) == want, (argv, patterns)
    dfa = argvdfa.Dfa()
    argvdfa.compile_rule(dfa, 3, pats, 4096, unless)
    assert dfa.run(3, text) == (want if text.isascii() else None)


@pytest.mark.parametrize(("pattern", "text", "hit"), [
    (r"(?-i:^push$)", "push", True), (r"(?-i:^push$)", "PUSH", False), (r"(?-i:a(?i:b))", "aB", True),
    (r"(?-i:[a-c]x)", "Bx", False), (r"(?-i:[^a]x)", "Ax", True), (r"(?x) p u s h  # a comment", "push", True),
])
def test_case_folding_can_be_turned_off_in_a_group(pattern: str, text: str, hit: bool) -> None:
    """git's commands are case-sensitive (`git PUSH` is not push): `(?-i:...)` means in the
    kernel what it means to `re` with the policy's IGNORECASE."""
    rx = re.compile(pattern, re.I | re.S)
    assert bool(rx.search(text)) == hit
    assert argvdfa.rule_dfa([rx]).run(0, text.encode()) == hit


def test_an_exception_the_kernel_cannot_run_is_a_policy_error() -> None:
    from agentwarden.enforce.policy import PolicyError

    bad = "version: 1\nrules:\n  - name: r\n    when: {kind: exec, exec: {argv_unless: ['(?!a)b']}}\n    action: deny\n"
    with pytest.raises(PolicyError, match=r"when.exec.argv_unless: '\(\?!a\)b' must be a pattern the kernel can run"):
        parse(bad)
