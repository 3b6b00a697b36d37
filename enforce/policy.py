"""Policy files: parse, validate and evaluate (first matching rule decides).

`version: 1`, ordered `rules:` with `name`, `when:`, `action:`.  This module is
pure: it reads files and decides verdicts for recorded events.  enforce.kernel
compiles the same rules for the kernel; enforce.enforcer acts on both.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from agentwarden.core.events import ACTIONS, CAUSE_UNKNOWN, CauseInfo, Event, Identity, K8sInfo
from agentwarden.core.yamlkeys import key_lines
from agentwarden.enforce import argvdfa

# an exec alias meaning "could be any program" (enforce.programs: a loader target the agent can swap)
ANY_PROGRAM = "\0any-program"
DENYING = ("deny", "kill", "quarantine", "hold")

# Statements whose effect cannot be known from their text: a block or routine that builds
# and runs SQL at run time (DO, CALL, EXECUTE of a prepared statement, PREPARE), code that
# will run later or on other statements (functions, procedures, triggers, rules), and a COPY
# that runs a shell command on the server.  Each matches every denying SQL rule, whatever
# its command and table conditions, unless an earlier rule names it (or names OPAQUE, which
# stands for all of them, and for text the kernel's matcher could not read in full).
OPAQUE_SQL = ("DO", "CALL", "EXECUTE", "PREPARE", "CREATE FUNCTION", "CREATE PROCEDURE", "CREATE TRIGGER",
              "CREATE EVENT TRIGGER", "CREATE RULE", "COPY PROGRAM")
KINDS = ("exec", "connect", "sql", "http", "session")
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class PolicyError(ValueError):
    def __init__(self, rule: str, field_name: str, message: str, line: int | None, source: str = "") -> None:
        self.rule, self.field, self.line = rule, field_name, line
        where = f"{source}:{line}: " if line else (f"{source}: " if source else "")
        who = f"rule {rule!r}: " if rule else ""
        super().__init__(f"{where}{who}{field_name}: {message}" if field_name else f"{where}{who}{message}")


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    line: int
    agents: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()          # Unix groups of the person, or their identity provider's
    emails: tuple[str, ...] = ()          # verified identity-provider emails (globs: *@example.com)
    issuers: tuple[str, ...] = ()
    verified: bool | None = None          # the session's person logged in (`agentwarden login`)
    namespaces: tuple[str, ...] = ()      # Kubernetes namespace of the session's pod
    service_accounts: tuple[str, ...] = ()
    kind: str = ""
    exec_path: tuple[str, ...] = ()
    exec_argv: tuple[re.Pattern[str], ...] = ()
    exec_argv_unless: tuple[re.Pattern[str], ...] = ()   # ...and none of these matches
    # the patterns as one DFA when any names the argument boundary (argvdfa.boundary_aware)
    exec_argv_dfa: argvdfa.Dfa | None = field(default=None, compare=False, hash=False)
    exec_outside_workdir: bool = False   # a path argument resolves outside the agent's working directory
    # exceptions by the parent process: the rule does not hold when the parent's program
    # matches parent_path (none: any) and its argv matches parent_argv (none: any)
    exec_parent_unless: bool = False
    exec_parent_stdin: bool = False      # ...and the exec's standard input is a pipe the parent holds
    exec_parent_path: tuple[str, ...] = ()
    exec_parent_argv: tuple[re.Pattern[str], ...] = ()
    exec_parent_argv_dfa: argvdfa.Dfa | None = field(default=None, compare=False, hash=False)
    connect_dst: tuple[str, ...] = ()
    connect_port: tuple[tuple[int, int], ...] = ()
    connect_path: tuple[str, ...] = ()
    sql_command: tuple[str, ...] = ()
    sql_tables: tuple[str, ...] = ()
    sql_database: tuple[str, ...] = ()
    sql_regex: tuple[re.Pattern[str], ...] = ()
    http_method: tuple[str, ...] = ()
    http_host: tuple[str, ...] = ()
    http_path: tuple[str, ...] = ()
    http_unless_transport: bool = False   # not for a sender an exec rule's parent_unless let run
    session_as_root: bool | None = None  # the agent's root process runs as root (uid or euid 0)
    # the tool call behind an exec (daemon/lineage.py): asked False, none asked for it; True, one
    # did, of a model, API and tool matching these (none: any)
    cause_asked: bool | None = None
    cause_model: tuple[str, ...] = ()
    cause_provider: tuple[str, ...] = ()
    cause_tool: tuple[str, ...] = ()
    duration_s: int = 0
    timeout_s: int = 0
    approvers: tuple[str, ...] = ()
    code: bool = False                   # approving needs a one-time code sent out of band (webhook)
    hint: str = ""                       # told to the agent with a hold's refusal: what to run instead


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=list)
    source: str = ""
    # event kind -> the rules that can match it (of that kind, or of none), in order, and how
    # many rules the policy had then; made on first use (decide() runs once per event: it
    # took 10 µs a statement trying every rule)
    _by_kind: dict[str, tuple[int, tuple[Rule, ...]]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def uses_cause(self) -> bool:
        """A rule matches on an exec's cause: the daemon weighs its cause before deciding."""
        return any(r.cause_asked is not None for r in self.rules)

    def rules_for(self, kind: str) -> tuple[Rule, ...]:
        hit = self._by_kind.get(kind)
        if hit is not None and hit[0] == len(self.rules):
            return hit[1]
        rules = tuple(r for r in self.rules if not r.kind or r.kind == kind)
        self._by_kind[kind] = (len(self.rules), rules)
        return rules


@dataclass(frozen=True)
class Verdict:
    action: str
    rule: str          # "" for the default


def _seconds(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _DURATION.match(str(value))
    return int(m.group(1)) * _UNIT[m.group(2)] if m else None


def parse(text: str, source: str = "") -> Policy:
    try:
        lines = key_lines(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise PolicyError("", "", f"not valid YAML: {e}", mark.line + 1 if mark else None, source) from None

    def line_of(*path: str) -> int | None:
        for n in range(len(path), -1, -1):
            if tuple(path[:n]) in lines:
                return lines[tuple(path[:n])]
        return None

    if not isinstance(data, dict):
        raise PolicyError("", "", "expected a mapping with `version` and `rules`", 1, source)
    if data.get("version") != 1:
        raise PolicyError("", "version", f"expected 1, got {data.get('version')!r}", line_of("version"),
                          source)
    unknown = set(data) - {"version", "rules", "patterns"}
    if unknown:
        key = sorted(unknown)[0]
        raise PolicyError("", key, "unknown field (allowed: patterns, rules, version)", line_of(key), source)
    pieces = _patterns(data.get("patterns"), line_of, source)
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise PolicyError("", "rules", "expected a list of rules", line_of("rules"), source)
    policy = Policy(source=source)
    names: set[str] = set()
    for i, raw in enumerate(raw_rules):
        base = ("rules", str(i))
        policy.rules.append(_rule(raw, base, line_of, source, names, pieces))
    return policy


_PIECE = re.compile(r"<<([A-Za-z_][A-Za-z0-9_]*)>>")


def _patterns(raw: Any, line_of: Any, source: str) -> dict[str, str]:
    """`patterns:` name -> a regex piece that rule regexes use as <<name>> (a piece may use the
    pieces before it).  Each is checked as a regex of its own."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PolicyError("", "patterns", "expected a mapping of name: regex", line_of("patterns"), source)
    out: dict[str, str] = {}
    for name, text in raw.items():
        where = line_of("patterns", str(name))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise PolicyError("", "patterns", f"{name!r}: a name is letters, digits and _", where, source)
        if not isinstance(text, str):
            raise PolicyError("", f"patterns.{name}", "expected a regex", where, source)
        try:
            out[name] = _expand(text.strip(), out)   # a block scalar's last newline is not the regex's
            re.compile(out[name], re.I | re.S)
        except (KeyError, re.error) as e:
            raise PolicyError("", f"patterns.{name}", f"invalid: {e}", where, source) from None
    return out


def _expand(text: str, pieces: dict[str, str]) -> str:
    """Replace each <<name>> by its piece, as a group.  Raises KeyError for an unknown name."""
    def one(m: re.Match[str]) -> str:
        if m.group(1) not in pieces:
            raise KeyError(f"no pattern named {m.group(1)!r} (define it under patterns:)")
        return f"(?:{pieces[m.group(1)]})"
    return _PIECE.sub(one, text)


def _rule(raw: Any, base: tuple[str, ...], line_of: Any, source: str, names: set[str],
          pieces: dict[str, str] | None = None) -> Rule:
    name = raw.get("name") if isinstance(raw, dict) else None

    def err(field_name: str, message: str, *path: str) -> PolicyError:
        return PolicyError(str(name or f"#{int(base[1]) + 1}"), field_name, message,
                           line_of(*base, *path), source)

    if not isinstance(raw, dict):
        raise err("", "expected a mapping with name, when and action")
    if not isinstance(name, str) or not name:
        raise err("name", "expected a non-empty name", "name")
    if name in names:
        raise err("name", "duplicate rule name", "name")
    names.add(name)
    allowed = {"name", "when", "action", "duration", "approvers", "timeout", "code", "hint"}
    for key in raw:
        if key not in allowed:
            raise err(str(key), f"unknown field (allowed: {', '.join(sorted(allowed))})", str(key))
    action = raw.get("action")
    if action not in ACTIONS:
        raise err("action", f"expected one of {', '.join(ACTIONS)}, got {action!r}", "action")
    kw: dict[str, Any] = {}
    hint = raw.get("hint", "")
    if not isinstance(hint, str):
        raise err("hint", f"expected a line of text, got {hint!r}", "hint")
    kw["hint"] = " ".join(hint.split())
    if action == "quarantine":
        d = _seconds(raw.get("duration"))
        if d is None:
            raise err("duration", "quarantine needs a duration like 10m", "duration")
        kw["duration_s"] = d
    if action == "hold":
        t = _seconds(raw.get("timeout"))
        if t is None:
            raise err("timeout", "hold needs a timeout like 5m (the operation is denied when it expires)",
                      "timeout")
        approvers = raw.get("approvers")
        valid = isinstance(approvers, list) and bool(approvers) and all(
            isinstance(a, str) and (a == "self" or re.match(r"^(group|user|email):\S+$", a))
            for a in approvers)
        if not valid:
            raise err("approvers", "expected a list of self, group:NAME, user:NAME or email:ADDRESS",
                      "approvers")
        kw["timeout_s"], kw["approvers"] = t, tuple(approvers or ())
        code = raw.get("code", False)
        if not isinstance(code, bool):
            raise err("code", f"expected true or false, got {code!r}", "code")
        kw["code"] = code
    elif "code" in raw:
        raise err("code", "only a hold has approvals (and so a one-time code)", "code")
    when = raw.get("when") or {}
    if not isinstance(when, dict):
        raise err("when", "expected a mapping", "when")
    known = {"agent", "who", "kind", "cause", *KINDS}
    for key in when:
        if key not in known:
            raise err(f"when.{key}", f"unknown condition (allowed: {', '.join(sorted(known))})",
                      "when", str(key))

    def strings(obj: Any, field_name: str, *path: str) -> tuple[str, ...]:
        value = obj.get(path[-1], []) if isinstance(obj, dict) else []
        if isinstance(value, (str, int)):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            raise err(field_name, "expected a list", "when", *path)
        return tuple(str(v) for v in value)

    def regexes(values: tuple[str, ...], field_name: str, *path: str) -> tuple[re.Pattern[str], ...]:
        out = []
        for v in values:
            try:
                out.append(re.compile(_expand(v, pieces or {}), re.I | re.S))
            except KeyError as e:
                raise err(field_name, str(e.args[0]), "when", *path) from None
            except re.error as e:
                raise err(field_name, f"invalid regex {v!r}: {e}", "when", *path) from None
        return tuple(out)

    kw["agents"] = strings(when, "when.agent", "agent")
    who = when.get("who") or {}
    if not isinstance(who, dict):
        raise err("when.who", "expected a mapping", "when", "who")
    for key in who:
        if key not in WHO_KEYS:
            raise err(f"when.who.{key}", f"unknown condition (allowed: {', '.join(WHO_KEYS)})", "when", "who",
                      str(key))
    kw["users"] = strings(who, "when.who.users", "who", "users")
    kw["groups"] = strings(who, "when.who.groups", "who", "groups")
    kw["emails"] = tuple(e.lower() for e in strings(who, "when.who.emails", "who", "emails"))
    kw["issuers"] = tuple(i.rstrip("/") for i in strings(who, "when.who.issuers", "who", "issuers"))
    kw["namespaces"] = strings(who, "when.who.namespaces", "who", "namespaces")
    kw["service_accounts"] = strings(who, "when.who.service_accounts", "who", "service_accounts")
    for sa in kw["service_accounts"]:
        if sa.count("/") != 1 or not all(sa.split("/")):
            # a bare name would match a service account of that name in any namespace, and any
            # tenant may create one (red team)
            raise err("when.who.service_accounts", f"expected NAMESPACE/NAME, got {sa!r}", "when", "who",
                      "service_accounts")
    verified = who.get("verified")
    if verified is not None and not isinstance(verified, bool):
        raise err("when.who.verified", f"expected true or false, got {verified!r}", "when", "who", "verified")
    kw["verified"] = verified
    kind = when.get("kind", "")
    if kind and kind not in KINDS:
        raise err("when.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}", "when", "kind")
    present = [k for k in KINDS if k in when]
    if kind and present and present != [kind]:
        raise err("when.kind", f"kind {kind} does not match the condition on {present[0]}", "when", "kind")
    kw["kind"] = kind or (present[0] if len(present) == 1 else "")
    ex = when.get("exec") or {}
    kw["exec_path"] = strings(ex, "when.exec.path", "exec", "path")
    kw["exec_argv"] = regexes(strings(ex, "when.exec.argv", "exec", "argv"), "when.exec.argv", "exec", "argv")
    kw["exec_argv_unless"] = regexes(strings(ex, "when.exec.argv_unless", "exec", "argv_unless"),
                                     "when.exec.argv_unless", "exec", "argv_unless")
    for rx in kw["exec_argv_unless"]:
        try:
            argvdfa.rule_dfa([rx])
        except argvdfa.Unsupported as e:
            raise err("when.exec.argv_unless", f"{rx.pattern!r} must be a pattern the kernel can run: {e}",
                      "when", "exec", "argv_unless") from None
    if kw["exec_argv_unless"] or any(argvdfa.boundary_aware(rx) for rx in kw["exec_argv"]):
        # the DFA is the meaning on both sides (a rule with exceptions always: "matches and
        # no exception does" is one table in the kernel, and the same table here)
        try:
            kw["exec_argv_dfa"] = argvdfa.rule_dfa(list(kw["exec_argv"]), unless=kw["exec_argv_unless"])
        except argvdfa.Unsupported as e:
            raise err("when.exec.argv", f"a pattern that names the argument boundary (\\x00), or of a rule "
                      f"with argv_unless, must be one the kernel can run: {e}",
                      "when", "exec", "argv") from None
    outside = ex.get("outside_workdir", False) if isinstance(ex, dict) else False
    if not isinstance(outside, bool):
        raise err("when.exec.outside_workdir", f"expected true or false, got {outside!r}", "when", "exec",
                  "outside_workdir")
    kw["exec_outside_workdir"] = outside
    pu = ex.get("parent_unless") if isinstance(ex, dict) else None
    if pu is not None:
        if not isinstance(pu, dict) or not pu:
            raise err("when.exec.parent_unless", "expected a mapping with path and/or argv",
                      "when", "exec", "parent_unless")
        for key in pu:
            if key not in ("path", "argv", "stdin_from_parent"):
                raise err(f"when.exec.parent_unless.{key}",
                          "unknown condition (allowed: argv, path, stdin_from_parent)",
                          "when", "exec", "parent_unless", str(key))
        feeds = pu.get("stdin_from_parent", False)
        if not isinstance(feeds, bool):
            raise err("when.exec.parent_unless.stdin_from_parent", f"expected true or false, got {feeds!r}",
                      "when", "exec", "parent_unless", "stdin_from_parent")
        kw["exec_parent_unless"], kw["exec_parent_stdin"] = True, feeds
        kw["exec_parent_path"] = strings(pu, "when.exec.parent_unless.path", "exec", "parent_unless", "path")
        kw["exec_parent_argv"] = regexes(strings(pu, "when.exec.parent_unless.argv", "exec", "parent_unless",
                                                 "argv"), "when.exec.parent_unless.argv",
                                         "exec", "parent_unless", "argv")
        if kw["exec_parent_argv"]:
            try:   # one meaning, the DFA's (arguments joined by NUL), like argv_unless
                kw["exec_parent_argv_dfa"] = argvdfa.rule_dfa(list(kw["exec_parent_argv"]))
            except argvdfa.Unsupported as e:
                raise err("when.exec.parent_unless.argv", f"must be patterns the kernel's DFA can run: {e}",
                          "when", "exec", "parent_unless", "argv") from None
    if isinstance(ex, dict):
        for key in ex:
            if key not in ("path", "argv", "argv_unless", "outside_workdir", "parent_unless"):
                raise err(f"when.exec.{key}",
                          "unknown condition (allowed: argv, argv_unless, outside_workdir, parent_unless, "
                          "path)",
                          "when", "exec", str(key))
    co = when.get("connect") or {}
    kw["connect_dst"] = strings(co, "when.connect.dst", "connect", "dst")
    for d in kw["connect_dst"]:
        if "/" in d:
            try:
                ipaddress.ip_network(d, strict=False)
            except ValueError:
                raise err("when.connect.dst", f"invalid CIDR {d!r}", "when", "connect", "dst") from None
    ports = []
    for p in strings(co, "when.connect.port", "connect", "port"):
        m = re.match(r"^(\d+)(?:-(\d+))?$", p)
        if not m or not 0 < int(m.group(1)) <= int(m.group(2) or m.group(1)) <= 65535:
            raise err("when.connect.port", f"expected a port or a range like 5432 or 8000-8999, got {p!r}",
                      "when", "connect", "port")
        ports.append((int(m.group(1)), int(m.group(2) or m.group(1))))
    kw["connect_port"] = tuple(ports)
    kw["connect_path"] = strings(co, "when.connect.path", "connect", "path")
    sq = when.get("sql") or {}
    commands = strings(sq, "when.sql.command", "sql", "command")
    kw["sql_command"] = tuple(" ".join(c.upper().split()) for c in commands)
    kw["sql_tables"] = strings(sq, "when.sql.tables", "sql", "tables")
    kw["sql_database"] = strings(sq, "when.sql.database", "sql", "database")
    kw["sql_regex"] = regexes(strings(sq, "when.sql.regex", "sql", "regex"), "when.sql.regex", "sql", "regex")
    se = when.get("session") or {}
    if not isinstance(se, dict) or set(se) - {"as_root"}:
        raise err("when.session", "expected a mapping with as_root", "when", "session")
    as_root = se.get("as_root")
    if as_root is not None and not isinstance(as_root, bool):
        raise err("when.session.as_root", f"expected true or false, got {as_root!r}", "when", "session",
                  "as_root")
    kw["session_as_root"] = as_root
    if kw["kind"] == "session" and action not in ("allow", "audit", "deny", "kill"):
        raise err("action", "a session rule allows, audits or refuses (deny/kill) the session", "action")
    ht = when.get("http") or {}
    kw["http_method"] = tuple(m.upper() for m in strings(ht, "when.http.method", "http", "method"))
    # as host_name() reads a request's: no trailing dot, and an IPv6 literal's brackets literal, not
    # a glob's class (red team: `secrets.internal.` in a rule met no request; `[fd00::1]` none either)
    kw["http_host"] = tuple(("[[]" + h[1:] if h.startswith("[") else h).lower().rstrip(".")
                            for h in strings(ht, "when.http.host", "http", "host"))
    kw["http_path"] = strings(ht, "when.http.path", "http", "path")
    ut = ht.get("unless_judged_transport", False) if isinstance(ht, dict) else False
    if not isinstance(ut, bool):
        raise err("when.http.unless_judged_transport", f"expected true or false, got {ut!r}", "when", "http",
                  "unless_judged_transport")
    kw["http_unless_transport"] = ut
    if "cause" in when:
        ca = when.get("cause")
        if not isinstance(ca, dict) or not ca:
            raise err("when.cause", "expected a mapping with asked, model, provider and/or tool", "when",
                      "cause")
        for key in ca:
            if key not in CAUSE_KEYS:
                raise err(f"when.cause.{key}", f"unknown condition (allowed: {', '.join(CAUSE_KEYS)})",
                          "when", "cause", str(key))
        if kw["kind"] != "exec":
            # a statement or request is judged in the kernel as it is sent, before any cause could be
            # weighed; only an exec waits, stopped, for the daemon (red team: a rule that could not
            # hold before the fact would read as if it did)
            raise err("when.cause", "only an exec rule (kind: exec) may match on cause: statements and "
                      "requests are judged in the kernel as they are sent", "when", "cause")
        asked = ca.get("asked")
        if asked is not None and not isinstance(asked, bool):
            raise err("when.cause.asked", f"expected true or false, got {asked!r}", "when", "cause", "asked")
        kw["cause_model"] = strings(ca, "when.cause.model", "cause", "model")
        providers = strings(ca, "when.cause.provider", "cause", "provider")
        kw["cause_provider"] = tuple(p.lower() for p in providers)
        kw["cause_tool"] = strings(ca, "when.cause.tool", "cause", "tool")
        named = kw["cause_model"] or kw["cause_provider"] or kw["cause_tool"]
        if asked is False and named:
            raise err("when.cause.asked", "asked: false (no tool call asked for it) names no model, provider "
                      "or tool", "when", "cause", "asked")
        kw["cause_asked"] = True if named else asked
    return Rule(name=name, action=action, line=line_of(*base) or 0, **kw)


def _any_glob(value: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, g) for g in globs)


def host_read(value: str) -> str:
    """A Host value (or :authority) as the kernel's matcher reads it (guard_http.bpf.c
    http_candidates): the blanks before it skipped, then the name up to a ':' or a blank or
    control byte, in lower case.  The approvals' request key is made of this spelling."""
    return re.split(r"[\x00-\x20:]", value.lstrip(" \t"), maxsplit=1)[0].lower()


def host_name(value: str) -> str:
    """The site a Host value names, as servers route by it: host_read, an IPv6 literal kept
    whole, and without a fully qualified name's trailing dot (`secrets.internal.` is
    `secrets.internal` to DNS and nginx; red team).  "" when it names none."""
    v = value.lstrip(" \t").lower()
    if v.startswith("["):
        return v.split("]", 1)[0] + "]" if "]" in v else ""
    return host_read(v).rstrip(".")


def outside(workdir: str, cwd: str, argv: list[str]) -> bool:
    """Does a path argument resolve outside workdir?  Unknown workdir: yes.

    Paths resolve as the kernel will resolve them: against the process's real working
    directory, through `..` and symlinks (`rm -rf link/x` where link points elsewhere is
    outside).  A path that passes through a symlink counts as outside wherever the link
    points now: the process resolves it again after the decision, and the agent could swap
    the link in between.  Arguments after `--` are paths even when they start with `-`.
    """
    if not workdir:
        return True
    root = os.path.realpath(workdir)
    options = True
    for arg in argv[1:]:
        if options and arg == "--":
            options = False
            continue
        if not arg or (options and arg.startswith("-")):
            continue
        joined = os.path.join(cwd or "/", os.path.expanduser(arg))
        if _through_symlink(joined):
            return True
        path = os.path.realpath(joined)
        if path != root and not path.startswith(root.rstrip("/") + "/"):
            return True
    return False


def _through_symlink(path: str) -> bool:
    """Is a component of path (the last one included) a symlink?"""
    parts = os.path.normpath(path).split("/")
    cur = "/"
    for part in parts:
        if not part:
            continue
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            return True
    return False


@dataclass(frozen=True)
class Parent:
    """An exec's parent process, as parent_unless judges it."""

    exe: str
    argv: list[str]
    trusted: bool = True       # its program file is one the exec's user could not have written
    feeds_stdin: bool = False  # the exec's standard input is a pipe the parent holds an end of
    direct: bool = False       # the exec is its process's first since the parent forked it (no shell)


def matches(rule: Rule, ev: Event, groups: frozenset[str] = frozenset(), workdir: str = "",
            aliases: tuple[str, ...] = (), parent: Parent | None = None) -> bool:
    """Does the rule's `when` hold for this event?

    `groups`: the launching person's groups; `workdir`: the agent's working directory;
    `aliases`: other paths the executed program is (enforce.programs: a copy of /usr/bin/rm is
    /usr/bin/rm too); `parent`: the exec's parent process (program path, argv), None when
    unknown (then no parent_unless exception applies: the rule holds).
    """
    if rule.agents and ev.agent not in rule.agents:
        return False
    if not who_holds(rule, ev.identity, groups, ev.k8s):
        return False
    kind = "session" if ev.kind == "session_start" else ev.kind
    if rule.kind and kind != rule.kind:
        return False
    if kind == "session" and rule.session_as_root is not None and \
            rule.session_as_root != (ev.process.uid == 0):
        return False
    if ev.kind == "exec" and ev.exec is not None:
        argv = " ".join(ev.process.argv)
        if rule.exec_path and ANY_PROGRAM not in aliases and \
                not any(_any_glob(p, rule.exec_path) for p in (ev.process.exe, *aliases)):
            return False
        if rule.exec_argv_dfa is not None:
            if not rule.exec_argv_dfa.run(0, argvdfa.argv_text(ev.process.argv), exact=True):
                return False
        elif rule.exec_argv and not any(rx.search(argv) for rx in rule.exec_argv):
            return False
        if rule.exec_outside_workdir and not outside(workdir, ev.process.cwd, ev.process.argv):
            return False
        if rule.exec_parent_unless and parent is not None and parent_excepted(rule, parent):
            return False
        if rule.cause_asked is not None and not caused_as(rule, ev.cause):
            return False
    if ev.kind in ("connect", "sql", "http") and ev.net is not None and (
            rule.connect_dst or rule.connect_port or rule.connect_path):
        n = ev.net
        if rule.connect_path and not _any_glob(n.path, rule.connect_path):
            return False
        if rule.connect_port and not any(lo <= n.dst_port <= hi for lo, hi in rule.connect_port):
            return False
        if rule.connect_dst and not any(_dst_matches(n.dst_ip, n.sni, d) for d in rule.connect_dst):
            return False
    if ev.kind == "sql" and ev.sql is not None:
        s = ev.sql
        commands = {c.strip() for c in s.command.split("/")}
        opaque = bool(commands & set(OPAQUE_SQL))
        if opaque:
            commands.add("OPAQUE")
        if rule.sql_database and s.database not in rule.sql_database:
            return False
        named = bool(rule.sql_command) and bool(commands & set(rule.sql_command))
        if opaque and rule.action in DENYING and not named:
            return True    # its tables and effect are unknown: it could be what the rule forbids
        if rule.sql_command and not named:
            return False
        if rule.sql_tables and not any(_any_glob(t, rule.sql_tables) for t in s.tables):
            return False
        if rule.sql_regex and not any(rx.search(s.query) for rx in rule.sql_regex):
            return False
    if ev.kind == "http" and ev.http is not None:
        h = ev.http
        if rule.http_method and h.method.upper() not in rule.http_method:
            return False
        # a request that names no host (none, or an empty Host) may be for any site: it meets
        # every rule that does not allow, as in the kernel (guard_http.bpf.c http_candidates)
        name = host_name(h.host)
        if rule.http_host and (not _any_glob(name, rule.http_host) if name else rule.action == "allow"):
            return False
        if rule.http_path and not _any_glob(h.path, rule.http_path):
            return False
    return True


IDENTITY_RULE = "identity-required"


def with_identity_rule(policy: Policy, action: str, timeout_s: int) -> Policy:
    """The policy with identity.require's rule first: a session whose person has not logged in
    (`who: {verified: false}`) is held at its root's first instruction until they do (`hold`,
    for at most timeout_s), or refused (`deny`).  Built here, not parsed: `kind: session` rules
    written in a policy cannot hold."""
    rule = Rule(name=IDENTITY_RULE, action=action, line=0, kind="session", verified=False,
                timeout_s=timeout_s if action == "hold" else 0,
                hint="this agent session has no verified identity: run `agentwarden login` outside the "
                     "agent, then start it again")
    return Policy(rules=[rule, *[r for r in policy.rules if r.name != IDENTITY_RULE]], source=policy.source)


WHO_KEYS = ("users", "groups", "emails", "issuers", "verified", "namespaces", "service_accounts")
CAUSE_KEYS = ("asked", "model", "provider", "tool")


def has_who(rule: Rule) -> bool:
    return bool(rule.users or rule.groups or rule.emails or rule.issuers or rule.verified is not None
                or rule.namespaces or rule.service_accounts)


def who_holds(rule: Rule, ident: Identity, unix_groups: frozenset[str], k8s: K8sInfo | None) -> bool:
    """Do the rule's `who` conditions hold for a session's person (and its pod)?  The one test
    for both the daemon's decisions and the kernel's per-session rule mask (enforce/kernel.py).

    Groups are the person's Unix groups and, when verified, their identity provider's.  When the
    provider did not list them (`groups_unknown`), a group condition is unknown: it fails for an
    `allow` or `audit` rule and holds for a refusing one (fail closed both ways)."""
    if rule.users and not ({ident.user, ident.login_user} & set(rule.users)):
        return False
    if rule.verified is not None and rule.verified != ident.verified:
        return False
    if rule.issuers and not (ident.verified and ident.issuer.rstrip("/") in rule.issuers):
        return False
    if rule.emails and not (ident.verified and ident.email
                            and _any_glob(ident.email.lower(), rule.emails)):
        return False
    if rule.groups:
        provider = set(ident.groups) if ident.verified else set()
        member = bool((unix_groups | provider) & set(rule.groups))
        unknown = ident.verified and ident.groups_unknown
        if not member and not (unknown and rule.action in DENYING):
            return False
    if rule.namespaces and not (k8s is not None and _any_glob(k8s.namespace, rule.namespaces)):
        return False
    return not rule.service_accounts or (
        k8s is not None and f"{k8s.namespace}/{k8s.service_account}" in rule.service_accounts)


def parent_excepted(rule: Rule, parent: Parent) -> bool:
    """Is this parent one the rule's parent_unless names?  A name is not enough: the program file
    must be one the exec's user could not have written or replaced (a copy of bash named git
    is not git), and with stdin_from_parent the exec must be the parent's own child, with no
    program between (a shell the parent ran, a hook), reading a pipe the parent holds."""
    if not parent.trusted or (rule.exec_parent_stdin and not (parent.feeds_stdin and parent.direct)):
        return False
    if rule.exec_parent_path and not _any_glob(parent.exe, rule.exec_parent_path):
        return False
    dfa = rule.exec_parent_argv_dfa
    return dfa is None or bool(dfa.run(0, argvdfa.argv_text(parent.argv), exact=True))


def _dst_matches(ip: str, sni: str, dst: str) -> bool:
    if "/" in dst:
        try:
            return ipaddress.ip_address(ip) in ipaddress.ip_network(dst, strict=False)
        except ValueError:
            return False
    return dst in (ip, sni)


def caused_as(rule: Rule, cause: CauseInfo | None) -> bool:
    """Does the exec's cause (daemon/lineage.py; None: no tool call asked for it) meet when.cause?

    An unknown cause (CAUSE_UNKNOWN: the capture was behind) meets every rule that denies, kills,
    quarantines or holds, and no other: a rule on who asked fails closed, never open.
    """
    if cause is not None and cause.match == CAUSE_UNKNOWN:
        return rule.action in DENYING
    if cause is None or not cause.tool_call_id:
        return rule.cause_asked is False
    if rule.cause_asked is False:
        return False
    return ((not rule.cause_model or _any_glob(cause.model, rule.cause_model))
            and (not rule.cause_provider or cause.provider.lower() in rule.cause_provider)
            and (not rule.cause_tool or _any_glob(cause.tool, rule.cause_tool)))


def decide(policy: Policy, ev: Event, groups: frozenset[str] = frozenset(), workdir: str = "",
           aliases: tuple[str, ...] = (), parent: Parent | None = None) -> Verdict:
    """The first matching rule decides; the default is audit."""
    for rule in policy.rules_for("session" if ev.kind == "session_start" else ev.kind):
        if matches(rule, ev, groups, workdir, aliases, parent):
            return Verdict(rule.action, rule.name)
    return Verdict("audit", "")
