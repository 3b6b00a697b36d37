"""Policy files: validation with rule, field and line; first match decides; dry-run replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from agentwarden.core.events import Event, ExecInfo, Identity, NetInfo, Process, SqlInfo
from agentwarden.daemon.l7.sql import analyze
from agentwarden.enforce.kernel import compile_policy
from agentwarden.enforce.policy import Parent, PolicyError, decide, parse
from conftest import Daemon, cli, ended

REPO = Path(__file__).resolve().parents[1]


def sql_event(text: str, database: str = "shop") -> Event:
    (s,) = analyze(text)
    return Event(kind="sql", ts_ns=1, host="h", agent="cursor", identity=Identity(1000, "alice"),
                 net=NetInfo("tcp", "10.0.0.5", 5432), sql=SqlInfo(query=s.text, command=s.command,
                                                                   tables=list(s.tables), database=database))


WORKDIR = "/home/alice/proj"


def exec_event(exe: str, argv: list[str], cwd: str = WORKDIR) -> Event:
    return Event(kind="exec", ts_ns=1, host="h", agent="cursor", identity=Identity(1000, "alice"),
                 process=Process(exe=exe, argv=argv, cwd=cwd), exec=ExecInfo(filename=exe))


def http_event(method: str, path: str, host: str = "git.example.com") -> Event:
    from agentwarden.core.events import HttpInfo

    return Event(kind="http", ts_ns=1, host="h", agent="cursor", identity=Identity(1000, "alice"),
                 net=NetInfo("tcp", "10.0.0.7", 443), http=HttpInfo(method=method, host=host, path=path))


@pytest.mark.parametrize(("method", "path", "held"), [
    ("POST", "/org/repo.git/git-receive-pack", True), ("POST", "/git-receive-pack", True),
    ("GET", "/org/repo.git/info/refs", False), ("POST", "/org/repo.git/git-upload-pack", False),
    ("POST", "/org/git-receive-pack/x", False), ("GET", "/org/repo.git/git-receive-pack", False),
])
def test_the_push_protocol_on_the_wire_is_held(method: str, path: str, held: bool) -> None:
    """A client of the agent's own speaking git's smart-HTTP push: its POST to git-receive-pack
    is held (fetches and the ref advertisement are not)."""
    pol = parse((REPO / "deploy/policy.yaml").read_text())
    assert (decide(pol, http_event(method, path)).rule == "hold-git-push-on-the-wire") == held


def test_default_policy_is_valid_and_decides() -> None:
    pol = parse((REPO / "deploy/policy.yaml").read_text())
    assert decide(pol, sql_event('/* x */ dRoP  TaBlE "Users"')).action == "deny"
    assert decide(pol, sql_event("truncate t")).rule == "no-drop-or-truncate-table"
    assert decide(pol, sql_event("select 1")).action == "audit"
    assert decide(pol, exec_event("/usr/bin/git", ["git", "push", "--force", "origin"])).action == "hold"
    assert decide(pol, exec_event("/usr/bin/git", ["git", "push", "origin", "HEAD:main"])).action == "audit"
    assert decide(pol, exec_event("/usr/bin/git", ["git", "push", "origin"])).rule == "hold-push-without-refspec"
    rm = exec_event("/usr/bin/rm", ["rm", "-rf", "/srv/data"])
    assert decide(pol, rm, workdir=WORKDIR).action == "hold"
    assert decide(pol, exec_event("/usr/bin/rm", ["rm", "-rf", "build"]), workdir=WORKDIR).action == "audit"
    assert decide(pol, exec_event("/usr/bin/rm", ["rm", "-r", "./a", f"{WORKDIR}/b"]), workdir=WORKDIR).action \
        == "audit"
    assert decide(pol, exec_event("/usr/bin/rm", ["rm", "--recursive", "../other"]), workdir=WORKDIR).action \
        == "hold"
    # cd / first: a relative path is still outside the agent's working directory
    assert decide(pol, exec_event("/usr/bin/rm", ["rm", "-rf", "home/bob"], cwd="/"), workdir=WORKDIR).action \
        == "hold"
    assert decide(pol, exec_event("/usr/bin/rm", ["rm", "-f", "/tmp/x"]), workdir=WORKDIR).action == "audit"
    # working directory unknown: held (fail closed)
    assert decide(pol, exec_event("/usr/bin/rm", ["rm", "-rf", "build"])).action == "hold"
    meta = Event(kind="connect", ts_ns=1, host="h", net=NetInfo("tcp", "169.254.169.254", 80))
    assert decide(pol, meta).rule == "no-cloud-metadata"


def test_first_match_decides_and_conditions_combine() -> None:
    pol = parse("""
version: 1
rules:
  - name: allow-alice-reports
    when: {who: {users: [alice]}, sql: {tables: ["reports_*"]}}
    action: allow
  - name: quarantine-prod
    when: {sql: {database: [prod], regex: ['delete\\s+from']}}
    action: quarantine
    duration: 10m
  - name: deny-deletes
    when: {kind: sql, sql: {command: [DELETE]}}
    action: deny
""")
    assert decide(pol, sql_event("delete from reports_2026")).action == "allow"
    assert decide(pol, sql_event("delete from orders", "prod")) .rule == "quarantine-prod"
    assert decide(pol, sql_event("delete from orders")).rule == "deny-deletes"
    assert pol.rules[1].duration_s == 600


def test_an_exec_is_matched_on_the_tool_call_that_asked_for_it() -> None:
    from agentwarden.core.events import CauseInfo

    pol = parse("""
version: 1
rules:
  - name: cheap-rm
    when: {kind: exec, exec: {path: ["*/rm"]}, cause: {model: ["cheap-*"], provider: [OpenAI]}}
    action: deny
  - name: unasked
    when: {kind: exec, cause: {asked: false}}
    action: hold
    approvers: [user:root]
    timeout: 2m
  - name: asked-by-shell-tool
    when: {exec: {path: ["*/rm"]}, cause: {tool: [bash]}}
    action: audit
""")
    assert pol.uses_cause
    rm = exec_event("/usr/bin/rm", ["rm", "-f", "x"])
    assert decide(pol, rm).rule == "unasked"
    rm.cause = CauseInfo("e1", "t1", "bash", "command", "cheap-1", "openai")
    assert decide(pol, rm).rule == "cheap-rm"
    rm.cause = CauseInfo("e1", "t1", "bash", "parent", "gpt-5", "openai")
    assert decide(pol, rm).rule == "asked-by-shell-tool"
    rm.cause = CauseInfo("e1", "t1", "edit", "command", "cheap-1", "anthropic")
    assert decide(pol, rm).rule == ""
    plan = compile_policy(pol)
    assert plan.exact == 0, "a rule on cause is decided in userspace, the exec stopped"
    assert "userspace decides" in plan.mechanisms["cheap-rm"][0] and plan.mechanisms["cheap-rm"][1] == "before"


@pytest.mark.parametrize(("when", "field"), [
    ("{kind: sql, cause: {asked: false}}", "when.cause"),
    ("{http: {method: [GET]}, cause: {asked: true}}", "when.cause"),
    ("{cause: {asked: false}}", "when.cause"),
    ("{kind: exec, cause: {asked: false, model: [x]}}", "when.cause.asked"),
    ("{kind: exec, cause: {asked: maybe}}", "when.cause.asked"),
    ("{kind: exec, cause: {modle: [x]}}", "when.cause.modle"),
    ("{kind: exec, cause: []}", "when.cause"),
])
def test_a_condition_on_cause_outside_an_exec_rule_is_refused(when: str, field: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse(f"version: 1\nrules:\n  - name: a\n    when: {when}\n    action: deny\n")
    assert e.value.field == field, e.value


@pytest.mark.parametrize(("host", "rule"), [
    ("secrets.internal", "no-secrets"), ("Secrets.Internal.:8443", "no-secrets"), (" secrets.internal\t", "no-secrets"),
    ("docs.internal", "docs-ok"), ("docs.internal.", "docs-ok"),
    # a request that names no site may be for any: every rule but an allowing one holds for it
    ("", "no-secrets"), ("\r\n secrets.internal", "no-secrets"),
    ("[::1]:8080", ""), ("elsewhere", ""), ("[fd00::1]:443", "no-v6-literal"), ("[FD00::1]", "no-v6-literal"),
    ("f", ""),
])
def test_a_host_is_matched_as_servers_route_it(host: str, rule: str) -> None:
    pol = parse("""
version: 1
rules:
  - name: docs-ok
    when: {kind: http, http: {host: [docs.internal]}}
    action: allow
  - name: no-secrets
    when: {kind: http, http: {host: [secrets.internal.]}}
    action: deny
  - name: no-v6-literal
    when: {kind: http, http: {host: ["[fd00::1]"]}}
    action: deny
""")
    assert decide(pol, http_event("GET", "/", host)).rule == rule


@pytest.mark.parametrize("text, rule, field, line", [
    ("version: 2\nrules: []\n", "", "version", 1),
    ("version: 1\nrules:\n  - name: a\n    action: nuke\n", "a", "action", 4),
    ("version: 1\nrules:\n  - name: a\n    action: quarantine\n", "a", "duration", 3),
    ("version: 1\nrules:\n  - name: a\n    action: hold\n    timeout: 5m\n    approvers: [root]\n", "a",
     "approvers", 6),
    ("version: 1\nrules:\n  - name: a\n    when:\n      sql: {regex: ['(']}\n    action: deny\n", "a",
     "when.sql.regex", 5),
    ("version: 1\nrules:\n  - name: a\n    when:\n      connect: {port: [99999]}\n    action: deny\n", "a",
     "when.connect.port", 5),
    ("version: 1\nrules:\n  - name: a\n    when:\n      kind: sql\n      exec: {path: ['*']}\n    action: deny\n",
     "a", "when.kind", 5),
    ("version: 1\nrules:\n  - name: a\n    when: {colour: red}\n    action: deny\n", "a", "when.colour", 4),
    ("version: 1\nrules:\n  - {name: a, action: deny}\n  - {name: a, action: deny}\n", "a", "name", 4),
    ("version: 1\nrules:\n  - name: a\n    action: deny\n    hint: [x]\n", "a", "hint", 5),
])
def test_errors_name_rule_field_and_line(text: str, rule: str, field: str, line: int) -> None:
    with pytest.raises(PolicyError) as e:
        parse(text, "p.yaml")
    assert (e.value.rule, e.value.field, e.value.line) == (rule, field, line), str(e.value)


def test_cli_check(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "agentwarden.cli.main", "policy", "check",
                          str(REPO / "deploy/policy.yaml")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "15 rules, valid" in res.stdout and "no-drop-database" in res.stdout
    assert "hold-opaque-sql" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    action: maybe\n")
    res = subprocess.run([sys.executable, "-m", "agentwarden.cli.main", "policy", "check", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and f"{bad}:4: rule 'x': action:" in res.stderr


def test_cli_replays_a_recorded_session(daemon: Daemon, fake_agent: Path, tmp_path: Path) -> None:
    agent = subprocess.Popen([str(fake_agent), "-c", "/bin/echo harmless; /usr/bin/rm -rf /nonexistent/aw-x"])
    agent.communicate(timeout=30)
    events = daemon.session_events(agent.pid, lambda evs: ended(evs))
    sid = events[0]["session_id"]
    res = daemon.cli("policy", "test", str(REPO / "deploy/policy.yaml"), "--session", sid, "--json")
    assert res.returncode == 0, res.stderr
    (hit,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert hit["action"] == "hold" and hit["rule"] == "hold-recursive-rm-outside-workdir"
    assert hit["event"]["process"]["argv"] == ["/usr/bin/rm", "-rf", "/nonexistent/aw-x"]
    res = daemon.cli("policy", "test", str(REPO / "deploy/policy.yaml"), "--session", "no-such-session")
    assert res.returncode == 1 and "no recorded session 'no-such-session'" in res.stderr, res
    # with identity.require, as the daemon would run it: the unverified session itself is held first
    cfg = json.loads(daemon.config.read_text())
    cfg["identity"] = {**cfg.get("identity", {}), "require": True, "unverified": "hold",
                       "oidc": {"issuer": "https://idp.example", "client_id": "agentwarden"}}
    strict = tmp_path / "strict.yaml"
    strict.write_text(json.dumps(cfg))
    strict.chmod(0o600)
    res = cli(strict, "policy", "test", str(REPO / "deploy/policy.yaml"), "--session", sid, "--json")
    assert res.returncode == 0, res.stderr
    hits = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(h["rule"], h["action"], h["event"]["kind"]) for h in hits][0] == (
        "identity-required", "hold", "session_start"), hits


def test_daemonset_ships_the_default_policy() -> None:
    import yaml

    docs = list(yaml.safe_load_all((REPO / "deploy/kubernetes/agentwarden.yaml").read_text()))
    (cm,) = [d for d in docs if d.get("kind") == "ConfigMap"]
    assert cm["data"]["policy.yaml"].strip() == (REPO / "deploy/policy.yaml").read_text().strip()
    assert yaml.safe_load(cm["data"]["config.yaml"])["enforce"]["policy_file"] == "/etc/agentwarden/policy.yaml"


OPAQUE_POLICY = """
version: 1
rules:
  - {name: calls-ok, when: {kind: sql, sql: {command: [CALL]}}, action: allow}
  - {name: audit-selects, when: {kind: sql, sql: {command: [SELECT]}}, action: audit}
  - {name: no-billing, when: {kind: sql, sql: {tables: ["billing.*"]}}, action: kill}
  - {name: no-drop, when: {kind: sql, sql: {command: [DROP TABLE]}}, action: deny}
"""


@pytest.mark.parametrize(("text", "rule"), [
    ("do $$ begin execute 'drop table t'; end $$", "no-billing"),      # tables unknown: the first denying rule
    ("call p()", "calls-ok"),                                          # named by an earlier rule
    ("create procedure p() language sql as $$ drop table t $$", "no-billing"),
    ("copy t to program 'id'", "no-billing"),
    ("copy t to stdout", ""),                                          # an ordinary COPY is not opaque
    ("prepare q as delete from t", "no-billing"),
    ("execute q", "no-billing"),
    ("create trigger tr after insert on t execute function f()", "no-billing"),
    ("select 1", "audit-selects"),
])
def test_opaque_statements_meet_every_denying_rule(text: str, rule: str) -> None:
    policy = parse(OPAQUE_POLICY)
    assert decide(policy, sql_event(text)).rule == rule


def test_a_rule_can_name_every_opaque_statement() -> None:
    policy = parse(REPO.joinpath("deploy/policy.yaml").read_text())
    for text in ("do $$ begin null; end $$", "copy t to program 'id'", "create or replace function f() "
                 "returns int language sql as $$ select 1 $$"):
        assert decide(policy, sql_event(text)).rule == "hold-opaque-sql", text
    assert decide(policy, sql_event("drop table t")).rule == "no-drop-or-truncate-table"


HELD = "hold-force-push"
NOREF, BARE = "hold-push-without-refspec", "hold-push-of-a-bare-name"
CONFIG = (NOREF, BARE)
SETTING = "hold-git-settings-that-push-unseen"
HIDDEN = "hold-push-the-command-line-hides"
UNKNOWN = "hold-git-command-git-does-not-name"
TRANSPORT = "hold-git-transport-not-started-by-git"
SSHCMD = "hold-ssh-whose-remote-command-config-sets"
SPELLINGS = [
    (["git", "push", "--force"], HELD), (["git", "push", "-f", "origin", "main"], HELD),
    (["git", "push", "-vf", "origin"], HELD), (["git", "push", "-fu", "origin", "x"], HELD),
    (["git", "push", "--forc", "origin"], HELD), (["git", "push", "--force-with-lease"], HELD),
    (["git", "push", "--force-w=main"], HELD), (["git", "push", "origin", "+HEAD:main"], HELD),
    (["git", "push", "origin", ":main"], HELD), (["git", "push", "--mirror"], HELD),
    (["git", "push", "--mir"], HELD), (["git", "push", "-d", "origin", "x"], HELD),
    (["git", "push", "--delete", "origin", "x"], HELD), (["git", "push", "--prune", "origin"], HELD),
    (["git", "-c", "remote.origin.push=+HEAD:main", "push", "origin"], CONFIG),
    (["git", "-c", "alias.yolo=push -vf", "yolo"], SETTING),
    (["git", "send-pack", "--force", "x", "main"], HELD),
    (["git", "-c", "remote.origin.mirror=true", "push", "origin", "x"], SETTING),
    (["/usr/lib/git-core/git-push", "origin", "main"], HIDDEN), (["git-send-pack", "x", "main"], HIDDEN),
    (["git", "push", "origin", "HEAD:main"], ""), (["git", "push", "-u", "origin", "HEAD:x"], ""),
    # HEAD is a bare name too: a ref named HEAD or head makes git map it through configuration
    (["git", "push", "-u", "origin", "HEAD"], BARE), (["git", "push", "origin", "head"], BARE),
    # a source of 40 zeros is the null object: a delete
    (["git", "push", "origin", "0" * 40 + ":refs/heads/victim"], HELD),
    (["git", "send-pack", "../r", "0" * 64 + ":refs/heads/victim"], HELD),
    (["git", "log", "--format=%H", "0" * 40], ""),
    (["git", "status"], ""), (["git", "commit", "-m", "-f fix"], ""), (["git", "commit", "-m", "push"], ""),
    # refspecs from configuration the agent can write (remote.<name>.push = +..., mirror = true)
    (["git", "push"], CONFIG), (["git", "push", "origin"], CONFIG), (["git", "push", "-u", "origin"], CONFIG),
    (["git", "push", "--follow-tags"], CONFIG), (["git", "-C", "/x", "push", "--", "origin"], CONFIG),
    (["git", "push", "origin main"], CONFIG),                 # one argument: a remote named "origin main"
    (["git", "push", "-o", "origin", "main"], CONFIG),        # -o takes "origin": main is the remote
    (["git", "push", "-vo", "x", "origin"], CONFIG), (["git", "push", "--repo", "origin", "x"], CONFIG),
    (["git", "push", "--rec", "check", "origin"], CONFIG), (["git", "push", "--push-opt", "a", "b"], CONFIG),
    (["git", "--no-pager", "-c", "a=b", "push"], CONFIG), (["git", "push", "", ""], ""), (["git", "push", "-o", "ci.skip", "origin", "HEAD:main"], ""),
    (["git", "push", "--repo=origin", "main"], CONFIG), (["git", "push", "origin", "HEAD:x", "--porcelain"], ""),
    # a bare name: a +refs/heads/*:refs/heads/* push refspec in configuration makes it a force push
    (["git", "push", "origin", "main"], CONFIG), (["git", "push", "-u", "origin", "main"], CONFIG),
    (["git", "--config-env=remote.origin.push=M", "push", "origin", "main"], CONFIG),
    (["git", "push", "-ovo", "origin", "main", "HEAD"], CONFIG),   # -o takes "vo": main is a refspec
    (["git", "push", "-vo", "x", "origin", "HEAD:x"], ""), (["git", "push", "--repo", "x", "origin", "HEAD:x"], ""),
    (["git", "push", "origin", "main:main"], ""), (["git", "push", "origin", "HEAD:x", "x:y"], ""),
    (["git", "send-pack", "-f", "../r", "main"], HELD), (["git", "send-pack", "../r", ":victim"], HELD),
    (["git", "push", "-foci.skip", "origin", "HEAD:main"], HELD),
    (["git", "-c", "help.autocorrect=immediate", "psuh", "--force", "origin", "main"], SETTING),
    (["git", "stash", "push", "--message", "wip"], ""), (["git", "commit", "-m", "never push; use -d"], ""),
    (["git", "-c", "push.autoSetupRemote=true", "push", "-u", "origin", "HEAD:x"], ""),
    (["git", "commit", "-m", "see /tmp/git-push now"], ""),     # git-push named, not run as argv[0]
    (["git", "send-pack", "--stdin", "url"], HIDDEN), (["git", "send-pack", "--all", "url", "--std"], HIDDEN),
    # the transport git's own remote helper runs (its parent decides: see the next test; none known here)
    (["git", "send-pack", "--stateless-rpc", "--helper-status", "--thin", "url", "--stdin"], TRANSPORT),
    (["git", "send-pack", "--stateless", "--stdin", "url"], TRANSPORT),
    # a command word git does not know: help.autocorrect (from any config file) runs its guess
    (["git", "psuh", "origin", "HEAD:main"], UNKNOWN), (["git", "-C", "status", "psuh"], UNKNOWN),
    (["git", "--git-dir", "status", "psuh"], UNKNOWN), (["git", "Status"], UNKNOWN), (["git", "co", "x"], UNKNOWN),
    (["git", "--bogus", "status"], UNKNOWN), (["git", "http-push", "--force", "u", "x"], UNKNOWN),
    (["git", ""], UNKNOWN), (["/tmp/git-x/git", "psuh"], UNKNOWN),
    (["git", "credential-libsecret", "get"], ""), (["git", "-C", "/r", "credential-manager", "get"], ""),
    (["git", "PUSH"], (CONFIG[0], UNKNOWN)),
    (["git"], ""), (["git", "--version"], ""), (["git", "-v"], ""), (["git", "--no-pager", "diff"], ""),
    (["git", "-C", "/x", "log"], ""), (["git", "--git-dir=/x", "for-each-ref"], ""), (["git-upload-pack", "/x"], ""),
    (["/usr/lib/git-core/git", "pack-objects", "--revs"], ""), (["git", "lfs", "pull"], ""),
    (["git", "-c", "user.name=x", "commit", "-m", "psuh"], ""),
    (["git", "--work-tree", "/w", "--git-dir", "/g", "status"], ""),
    # ssh with no remote command on its command line runs the one a config file names (RemoteCommand)
    (["ssh", "host"], SSHCMD), (["ssh", "-F", "cfg", "host"], SSHCMD), (["ssh", "-p", "22", "host"], SSHCMD),
    (["ssh", "host", "-p", "22"], SSHCMD), (["ssh", "-oRemoteCommand=git-receive-pack r", "host"], (TRANSPORT, SSHCMD)),
    (["ssh", "-T", "git@host"], SSHCMD), (["ssh", "host", ""], SSHCMD), (["ssh", "--", "host"], SSHCMD),
    (["ssh", "-vp22", "host"], SSHCMD), (["ssh", "-"], SSHCMD), (["ssh", "host", "--"], SSHCMD),
    (["ssh", "-i", "-N", "host"], SSHCMD), (["ssh", "-l", "", "host", "-o", "X=y"], SSHCMD),
    (["ssh", "host", "uptime"], ""), (["ssh", "-N", "-L", "5432:db:5432", "host"], ""),
    (["ssh", "-fNL", "1:a:2", "host"], ""), (["ssh", "-W", "h:22", "jump"], ""), (["ssh", "-G", "host"], ""),
    (["ssh", "-V"], ""), (["ssh", "-O", "exit", "host"], ""), (["ssh", "-s", "host", "sftp"], ""),
    (["ssh", "-O", "proxy", "host"], SSHCMD), (["ssh", "-Oproxy", "host"], SSHCMD), (["ssh", "-Ocheck", "host"], ""),
    (["ssh", "-vO", "stop", "host"], ""), (["ssh", "host", "-O", "PROXY"], SSHCMD),
    (["ssh", "host", "", ""], ""), (["ssh", "host", "-N"], ""), (["ssh", "-p", "22", "host", "-t", "ls"], ""),
    (["kubectl", "delete", "pod", "x"], "hold-destructive-infra"),
    (["k", "delete", "pod", "x"], "hold-destructive-infra"),          # exec -a k kubectl ...
    (["terraform", "apply", "-destroy"], "hold-destructive-infra"),
    (["helm", "del", "release"], "hold-destructive-infra"), (["kubectl", "get", "pods"], ""),
]


@pytest.mark.parametrize(("argv", "rule"), SPELLINGS)
def test_default_policy_knows_the_option_grammar(argv: list[str], rule: str | tuple[str, ...]) -> None:
    """Policy meaning, not spelling; and the kernel's DFA says the same as the policy."""
    from agentwarden.enforce import kernel
    from agentwarden.enforce.argvdfa import argv_text

    policy = parse(REPO.joinpath("deploy/policy.yaml").read_text())
    exe = {"k": "/usr/bin/kubectl"}.get(argv[0], f"/usr/bin/{argv[0]}")
    if argv[0].rsplit("/", 1)[-1].startswith("git"):
        exe = "/usr/bin/git"     # git-push, git-send-pack: hard links of git (enforce.programs)
    got = decide(policy, exec_event(exe, argv)).rule
    assert got in (rule if isinstance(rule, tuple) else (rule,)), (argv, got)
    plan = kernel.compile_policy(policy)
    for i, r in enumerate(policy.rules):
        if i in plan.dfa.starts:
            want = any(rx.search(" ".join(argv)) for rx in r.exec_argv) if r.exec_argv_dfa is None \
                else r.exec_argv_dfa.run(0, argv_text(argv), exact=True)
            assert plan.dfa.run(i, argv_text(argv)) == want, (r.name, argv)


def fed(exe: str, argv: list[str]) -> Parent:
    """A parent that started the exec itself and writes its standard input (git's own way)."""
    return Parent(exe, argv, feeds_stdin=True, direct=True)


GIT_PUSH = fed("/usr/bin/git", ["git", "push", "origin", "HEAD:main"])
HELPER = fed("/usr/lib/git-core/git", ["git", "remote-https", "origin", "https://h/r"])
HELPER_BIN = Parent("/usr/lib/git-core/git-remote-http", ["git-remote-https", "origin", "https://h/r"],
                    feeds_stdin=True, direct=True)
BASH = fed("/usr/bin/bash", ["bash", "-c", "git remote-https origin https://h/r"])


@pytest.mark.parametrize(("exe", "argv", "parent", "held"), [
    # git's own chain of an HTTPS push: git push -> git remote-https -> git-remote-https -> send-pack
    ("/usr/bin/git", HELPER.argv, GIT_PUSH, False),
    (HELPER_BIN.exe, HELPER_BIN.argv, HELPER, False),
    ("/usr/bin/git", ["git", "send-pack", "--stateless-rpc", "--stdin", "https://h/r"], HELPER_BIN, False),
    ("/usr/bin/git", HELPER.argv, fed("/usr/bin/git", ["git", "-C", "/w", "fetch", "origin"]), False),
    ("/usr/bin/ssh", ["ssh", "host", "git-receive-pack 'r'"], GIT_PUSH, False),
    # the same started by anything else
    ("/usr/bin/git", HELPER.argv, BASH, True),
    (HELPER_BIN.exe, HELPER_BIN.argv, BASH, True),
    ("/usr/bin/git", HELPER.argv, fed("/usr/bin/git", ["git", "rebase", "--exec", "git remote-https o u"]), True),
    ("/usr/bin/git", HELPER.argv, fed("/usr/bin/git", ["git", "-C", "push", "rebase", "--exec", "x"]), True),
    ("/usr/bin/git", HELPER.argv, fed("/usr/bin/python3", ["git", "push"]), True),   # argv[0] is not the program
    ("/usr/bin/git", ["git", "send-pack", "--stateless-rpc", "--stdin", "u"], BASH, True),
    ("/usr/bin/git", ["git", "remote-fd", "0"], BASH, True), ("/usr/bin/git", ["git-remote-ext", "o", "u"], BASH, True),
    ("/usr/bin/ssh", ["ssh", "git@host", "git-receive-pack", "r"], BASH, True),
    ("/usr/bin/git", HELPER.argv, None, True),                                     # parent unknown: held
    # git's own file and command, but not feeding it: git ran a hook, an ssh or upload-pack command
    # (red team: GIT_SSH_COMMAND='exec git remote-http o URL <cmds', a pre-push hook)
    ("/usr/bin/git", HELPER.argv, Parent("/usr/bin/git", GIT_PUSH.argv), True),
    ("/usr/bin/git", HELPER.argv, Parent("/usr/bin/git", ["git", "ls-remote", "ssh://x/y"]), True),
    # a file named git that the agent's user wrote (a copy of bash)
    ("/usr/bin/git", HELPER.argv, Parent("/tmp/x/git", ["git", "-c", "x", "fetch"], trusted=False,
                                         feeds_stdin=True, direct=True), True),
    # git's fetch, fed from its pipe, but through a shell git ran (core.sshCommand='exec git
    # remote-http ... <&5' with the agent's pipe on fd 5: git holds it too; red team)
    ("/usr/bin/git", HELPER.argv, Parent("/usr/bin/git", ["git", "fetch", "ssh://x/y"], feeds_stdin=True),
     True),
    # not a transport: the parent does not matter
    ("/usr/bin/ssh", ["ssh", "host", "uptime"], BASH, False), ("/usr/bin/git", ["git", "remote", "-v"], BASH, False),
])
def test_a_transport_is_judged_by_the_process_that_started_it(
        exe: str, argv: list[str], parent: Parent | None, held: bool) -> None:
    """Remote helpers and stateless send-pack push what they read on stdin; git starts them for a
    push it judged, anything else that starts them is held (parent_unless)."""
    policy = parse(REPO.joinpath("deploy/policy.yaml").read_text())
    got = decide(policy, exec_event(exe, argv), parent=parent).rule
    assert (got == TRANSPORT) == held, (argv, parent, got)


def test_parent_unless_is_checked() -> None:
    from agentwarden.enforce.policy import PolicyError

    def policy(cond: str) -> str:
        return f"version: 1\nrules:\n  - name: r\n    when: {{kind: exec, exec: {cond}}}\n    action: deny\n"

    with pytest.raises(PolicyError, match=r"when.exec.parent_unless.pid: unknown condition"):
        parse(policy("{parent_unless: {pid: [1]}}"))
    with pytest.raises(PolicyError, match=r"when.exec.parent_unless: expected a mapping"):
        parse(policy("{parent_unless: []}"))
    with pytest.raises(PolicyError, match=r"when.exec.parent_unless.argv: must be patterns the kernel"):
        parse(policy("{parent_unless: {argv: ['(?=x)']}}"))
    with pytest.raises(PolicyError, match=r"when.exec.argv: no pattern named 'nope'"):
        parse(policy("{argv: ['<<nope>>']}"))
    pieces = "version: 1\npatterns: {a: 'x+', b: '<<a>>y'}\nrules:\n  - {name: r, when: {exec: {argv: ['^<<b>>$']}}, action: deny}\n"
    (rule,) = parse(pieces).rules
    assert rule.exec_argv[0].pattern == "^(?:(?:x+)y)$"
    with pytest.raises(PolicyError, match=r"patterns.a: invalid"):
        parse("version: 1\npatterns: {a: '(x'}\nrules: []\n")


@pytest.mark.parametrize(("argv", "held"), [
    (["rm", "-rf", "build"], False), (["rm", "-rf", "/etc"], True), (["rm", "-r", "../x"], True),
    (["rm", "--recu", "/tmp/x"], True), (["rm", "--r", "/tmp/x"], True), (["rm", "-fR", "/tmp/x"], True),
    (["rm", "-rf", "link/c"], True), (["rm", "-rf", "--", "-inside"], False), (["rm", "/tmp/x"], False),
    # through a symlink that points inside now: it could point elsewhere when rm resolves it again
    (["rm", "-rf", "inlink/x"], True),
])
def test_recursive_rm_resolves_symlinks_and_abbreviations(tmp_path: Path, argv: list[str], held: bool) -> None:
    workdir = tmp_path / "proj"
    (workdir / "build").mkdir(parents=True)
    (workdir / "link").symlink_to(tmp_path / "elsewhere")
    (workdir / "inlink").symlink_to(workdir / "build")
    policy = parse(REPO.joinpath("deploy/policy.yaml").read_text())
    verdict = decide(policy, exec_event("/usr/bin/rm", argv, cwd=str(workdir)), workdir=str(workdir))
    assert (verdict.rule == "hold-recursive-rm-outside-workdir") == held, (argv, verdict)
