"""Mask stage: secrets are replaced before an event leaves the daemon.

A secret becomes `[MASKED:<kind>:<hash>]`, where hash is a keyed HMAC of the
secret (key: a per-host random file), so the same secret always gives the
same marker and an auditor can correlate without seeing it, while nobody
without the key can test guesses against the marker.  Masking rewrites
strings; it never drops an event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from agentwarden.core.events import Event

log = logging.getLogger(__name__)

Rule = tuple[str, re.Pattern[str], int]   # kind, pattern, group holding the secret (0: whole match)

_SECRET_WORDS = r"(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|" \
                r"client[_-]?secret|signature|auth[_-]?token|authorization|credentials?|session(?:[_-]?id)?)"

# Formats that are secrets wherever they appear.
RULES: tuple[Rule, ...] = (
    ("pem_private_key", re.compile(
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"), 0),
    ("aws_access_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), 0),
    ("aws_secret_key", re.compile(r"(?i)(aws_secret_access_key\s*[=:]\s*[\"']?)([A-Za-z0-9/+=]{40})"), 2),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b"), 0),
    ("gitlab_token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b"), 0),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"), 0),
    # LLM providers' API keys, pasted into a prompt or a command (issue 15: Anthropic, OpenAI, Google)
    ("llm_api_key", re.compile(r"\bsk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"), 0),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), 0),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"), 0),
    ("bearer", re.compile(r"(?i)(\bbearer\s+)([A-Za-z0-9._~+/=-]{8,})"), 2),
    ("url_password", re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)([^@\s/]+)(?=@)"), 2),
    ("sql_password", re.compile(r"(?i)(\bPASSWORD\s+)('(?:[^']|'')*'|\$\$.*?\$\$)"), 2),
    ("password", re.compile(   # name=value, name: value, "name": "value" (JSON)
        r"(?i)(\b[A-Za-z0-9_.-]*" + _SECRET_WORDS
        + r"[A-Za-z0-9_.-]*[\"']?\s*[=:]\s*[\"']?)([^\s\"'&;,}]+)"), 2),
    # `--token X` inside one string (a shell -c script, a logged command line)
    ("password", re.compile(r"(--(?:password|passwd|pass|token|api-?key|secret|client-secret|access-key|"
                            r"secret-key|auth-token|private-key)\s+[\"']?)([^\s\"']+)"), 2),
    # any other `...key=value`: only when the value looks random (a name like `sort_key=date` stays)
    ("key", re.compile(r"(?i)(\b[A-Za-z0-9_.-]*key\s*[=:]\s*[\"']?)([^\s\"'&;,]+)"), 2),
)

# Header names whose whole value is a credential.
_SECRET_HEADER = re.compile(r"(?i)^(?:authorization|proxy-authorization|cookie|set-cookie|x-api-key|api-key|"
                            r"x-auth-token|x-access-token|x-csrf-token|x-xsrf-token|x-amz-security-token)$"
                            r"|token|secret|password|api[-_]?key|session")

# Every built-in rule needs one of these (case-insensitive); keep in step with RULES.
# Words every built-in rule needs one of (case-insensitive).  One plain alternation over the
# case-folded text, not an IGNORECASE one over the text: 0.2 to 1 µs a string instead of 1 to
# 6 (an HTTP event masks about ten strings, a statement one).
_HINT_WORDS = ("://", "private key", "akia", "asia", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat",
               "glpat-", "xox", "eyj", "bearer", "pass", "pwd", "secret", "token", "key", "signature", "auth",
               "credential", "session", "sk-", "aiza")
_HINT = re.compile("|".join(re.escape(w) for w in _HINT_WORDS))


def _hinted(s: str) -> bool:
    return _HINT.search(s.casefold()) is not None

_MARKER = re.compile(r"(\[MASKED:[a-z_]+:[0-9a-f]{12}\])")

# Options whose next argument is a secret, and tools whose short option carries one.
SECRET_OPTIONS = frozenset({
    "--password", "--passwd", "--pass", "--token", "--api-key", "--apikey", "--secret",
    "--client-secret", "--access-key", "--secret-key", "--auth-token", "--private-key",
})
SHORT_SECRET_OPTIONS = {
    "sshpass": "-p", "redis-cli": "-a", "mysql": "-p", "mysqldump": "-p", "mysqladmin": "-p", "mariadb": "-p",
    "mongosh": "-p", "mongo": "-p",
}
_ATTACHED_P = frozenset({"mysql", "mysqldump", "mysqladmin", "mariadb"})   # -pSECRET
_USERPASS = frozenset({"-u", "--user", "--proxy-user"})                   # curl -u user:pass


def entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(n / len(s) * math.log2(n / len(s)) for n in counts.values()) if s else 0.0


def high_entropy(value: str, minimum_length: int = 16, bits: float = 3.5) -> bool:
    return len(value) >= minimum_length and entropy(value) >= bits


def load_key(path: str) -> bytes:
    """The per-host masking key; created (0600) on first use."""
    p = Path(path)
    try:
        key = p.read_bytes()
        if len(key) >= 16:
            return key
    except FileNotFoundError:
        pass
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = os.urandom(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    log.info("created masking key %s", p)
    return key


class Masker:
    def __init__(self, key: bytes, extra_patterns: Iterable[str] = (),
                 extra_headers: Iterable[str] = ()) -> None:
        self._headers = frozenset(h.lower() for h in extra_headers)
        self._key = key
        extra = tuple(("custom", re.compile(p), 1 if re.compile(p).groups else 0) for p in extra_patterns)
        self.rules: tuple[Rule, ...] = RULES + extra
        self._extra = extra
        self._argv_cache: dict[tuple[str, ...], list[str]] = {}

    def marker(self, kind: str, secret: str) -> str:
        digest = hmac.new(self._key, secret.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        return f"[MASKED:{kind}:{digest[:12]}]"

    def text(self, s: str) -> str:
        if not s:
            return s
        # most strings (a SELECT, `ls -la`) hold none of the words every built-in rule
        # needs; this runs for every event, so they skip the rules
        rules = self.rules if _hinted(s) else self._extra
        for kind, rx, group in rules:
            # markers already placed are left alone: `[MASKED:url_password:…]` must not
            # look like `password:…` to the next rule
            parts = _MARKER.split(s)
            repl = self._replacer(kind, group)
            s = "".join(p if i % 2 else rx.sub(repl, p) for i, p in enumerate(parts))
        return s

    def _replacer(self, kind: str, group: int) -> Callable[[re.Match[str]], str]:
        def repl(m: re.Match[str]) -> str:
            secret = m.group(group)
            if not secret or secret.startswith("[MASKED:") or (kind == "key" and not high_entropy(secret)):
                return m.group(0)
            start, end = m.start(group) - m.start(0), m.end(group) - m.start(0)
            whole = m.group(0)
            return whole[:start] + self.marker(kind, secret) + whole[end:]
        return repl

    def argv(self, argv: list[str]) -> list[str]:
        """Masked copy; a process's argv is the same on each of its events, so it is cached."""
        key = tuple(argv)
        hit = self._argv_cache.get(key)
        if hit is None:
            if len(self._argv_cache) > 4096:
                self._argv_cache.clear()
            hit = self._argv_cache[key] = self._mask_argv(argv)
        return list(hit)

    def _mask_argv(self, argv: list[str]) -> list[str]:
        tool = os.path.basename(argv[0]) if argv else ""
        short = SHORT_SECRET_OPTIONS.get(tool)
        out: list[str] = []
        secret_next = ""
        for arg in argv:
            if secret_next:
                kind, secret_next = secret_next, ""
                if kind == "userpass" and ":" in arg:
                    user, _, pw = arg.partition(":")
                    out.append(f"{user}:{self.marker('password', pw)}")
                elif kind == "cookie":
                    out.append(self.marker("header", arg))
                elif kind == "header":
                    name, sep, value = arg.partition(":")
                    secret = sep and _SECRET_HEADER.search(name.strip())
                    out.append(f"{name}:{self.marker('header', value.strip())}" if secret else self.text(arg))
                else:
                    out.append(self.marker("password", arg))
                continue
            if arg in SECRET_OPTIONS or (short and arg == short):
                secret_next = "password"
                out.append(arg)
            elif arg in _USERPASS and tool == "curl":
                secret_next = "userpass"
                out.append(arg)
            elif arg in ("-b", "--cookie") and tool == "curl":
                secret_next = "cookie"
                out.append(arg)
            elif arg in ("-H", "--header") and tool in ("curl", "wget", "http", "xh"):
                secret_next = "header"
                out.append(arg)
            elif tool in _ATTACHED_P and arg.startswith("-p") and len(arg) > 2:
                out.append("-p" + self.marker("password", arg[2:]))
            else:
                out.append(self.text(arg))
        return out

    def event(self, ev: Event) -> Event:
        """The pipeline stage: masks in place and returns the event."""
        if ev.process.argv:
            ev.process.argv = self.argv(ev.process.argv)
        if ev.sql is not None:
            ev.sql.query = self.text(ev.sql.query)
            ev.sql.error = self.text(ev.sql.error)
        if ev.exec is not None and ev.exec.filename:
            ev.exec.filename = self.text(ev.exec.filename)
        if ev.http is not None:
            h = ev.http
            h.path, h.query = self.text(h.path), self.text(h.query)
            h.headers = self.headers(h.headers)
            h.response_headers = self.headers(h.response_headers)
            h.req_body, h.resp_body = self.text(h.req_body), self.text(h.resp_body)
            if h.rpc:
                h.rpc = {k: self.text(v) for k, v in h.rpc.items()}
        if ev.llm is not None:   # a prompt, a reply or a tool call's arguments may carry a pasted key
            m = ev.llm
            m.prompt, m.text = self.text(m.prompt), self.text(m.text)
            m.prompt_hash, m.system_hash = self.keyed(m.prompt_hash), self.keyed(m.system_hash)
            m.tool_calls = [{**t, "arguments": self.json_text(t.get("arguments", ""))} for t in m.tool_calls]
        return ev

    def keyed(self, digest: str) -> str:
        """A SHA-256 of text (an LLM prompt's) made keyed: HMAC with the masking key, so that equal
        prompts still compare equal across the trail, and a short one cannot be confirmed by hashing
        guesses (red team).  "" stays ""."""
        if not digest:
            return ""
        return hmac.new(self._key, b"llm-text:" + digest.encode(), hashlib.sha256).hexdigest()

    def json_text(self, text: str) -> str:
        """JSON text (a tool call's arguments) masked value by value: in the text itself a quote is
        `\\"`, and a rule's value stops at the backslash (red team: `export KEY=\\"sk-...\\"` kept the
        key).  Text that is not JSON is masked as text."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return self.text(text)

        changed = False

        def walk(v: object) -> object:
            nonlocal changed
            if isinstance(v, str):
                out = self.text(v)
                changed = changed or out != v
                return out
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            return v
        masked = walk(value)
        # as the model wrote it when nothing was masked; re-serialised only when something was
        return json.dumps(masked, ensure_ascii=False, separators=(",", ":")) if changed else text

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        """Credentials headers lose their whole value; others go through the text rules."""
        return {k: self.marker("header", v) if _SECRET_HEADER.search(k) or k.lower() in self._headers
                else self.text(v) for k, v in headers.items()}
