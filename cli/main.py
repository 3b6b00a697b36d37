"""The `agentwarden` command line (click)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import click
from agentwarden.cli import render
from agentwarden.core import identity
from agentwarden.core.events import ACTIONS, KINDS, format_ts, parse_ts
from agentwarden.core.version import VERSION
from agentwarden.daemon import config as config_mod
from agentwarden.daemon.control import ControlClient, ControlError
from agentwarden.daemon.query import MAX_LIMIT

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _load(path: str | None) -> config_mod.Config:
    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as e:
        click.echo(f"agentwarden: config error: {e}", err=True)
        sys.exit(2)
    identity.use_host_root(cfg.host_root)   # `policy test` in the pod judges the node's users
    return cfg


def _when(text: str | None, name: str) -> str | None:
    """'1h' (ago), or an RFC 3339 / ISO time -> RFC 3339."""
    if not text:
        return None
    m = _DURATION.match(text.strip())
    if m:
        return format_ts(time.time_ns() - int(float(m.group(1)) * _UNIT[m.group(2)] * 1e9))
    try:
        return format_ts(parse_ts(text))
    except ValueError:
        raise click.BadParameter(f"expected a duration like 15m, 1h, 7d or a time like "
                                 f"2026-11-23T10:00:00Z, got {text!r}", param_hint=name) from None


def _kinds(text: str | None) -> list[str]:
    kinds = [k.strip() for k in (text or "").split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            raise click.BadParameter(f"unknown kind {k!r}; kinds: {', '.join(KINDS)}", param_hint="--kind")
    return kinds


config_option = click.option("--config", "config_path", envvar="AGENTWARDEN_CONFIG",
                              type=click.Path(dir_okay=False), help="config file (YAML)")


def event_options(f: Any) -> Any:
    """The filters and output choices `tail` and `query` share (daemon.query.EventQuery)."""
    for opt in reversed([
        click.option("--session", help="only this session id"),
        click.option("--user", help="only sessions launched by this user (login user, or verified email)"),
        click.option("--agent", help="only this agent profile"),
        click.option("--kind", "kinds", help="comma-separated kinds: " + ",".join(KINDS)),
        click.option("--pid", type=click.IntRange(1, 2**32 - 1), help="only this process id"),
        click.option("--host", help="only events of this host"),
        click.option("--rule", help="only verdicts and approvals of this policy rule"),
        click.option("--action", type=click.Choice(ACTIONS), help="only verdicts with this action"),
        click.option("-o", "--output", type=click.Choice(["text", "json", "compact"]), default="text",
                     show_default=True, help="text: a line per event; json: the event; compact: JSON "
                                             "without empty fields"),
        click.option("--json", "as_json", is_flag=True, help="the same as -o json"),
        click.option("--color", "--colour", "color", type=click.Choice(["auto", "always", "never"]),
                     default="auto", show_default=True, help="auto: on a terminal, unless NO_COLOR is set"),
    ]):
        f = opt(f)
    return f


class Printer:
    """One event at a time, in the chosen output form."""

    def __init__(self, output: str, as_json: bool, color: str, with_date: bool = False) -> None:
        self.output = "json" if as_json else output
        self.colour = render.use_colour(color, sys.stdout.isatty())
        self.with_date = with_date

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.output == "json":
            click.echo(json.dumps(ev, ensure_ascii=False))
        elif self.output == "compact":
            click.echo(render.compact(ev))
        else:
            click.echo(render.line(ev, self.colour, self.with_date))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, "-V", "--version", prog_name="agentwarden")
def main() -> None:
    """Audit and control what AI coding agents do on this host."""


@main.command()
@config_option
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              envvar="AGENTWARDEN_LOG_FORMAT", help="the daemon's own log: text, or JSON a line")
def daemon(config_path: str | None, log_format: str) -> None:
    """Run the daemon in the foreground (ready when the control socket accepts)."""
    from agentwarden.daemon import logs

    cfg = _load(config_path)
    logs.configure(cfg.log_level, log_format)
    from agentwarden.daemon.secure import InsecureSetup
    from agentwarden.daemon.server import run

    try:
        run(cfg)
    except InsecureSetup as e:
        click.echo(f"agentwarden: refusing to start: {e}", err=True)
        sys.exit(1)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="the daemon's figures as JSON")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="seconds between the two samples that give events/s")
def status(config_path: str | None, as_json: bool, interval: float) -> None:
    """Is the daemon healthy: uptime, sessions, events/s, losses, store and spool, verdicts, approvals."""
    first = _request(config_path, "status")
    time.sleep(interval)
    st = _request(config_path, "status")
    st["events_per_s"] = round((st["pipeline"]["events"] - first["pipeline"]["events"]) / interval, 1)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    pipe, store, enf = st["pipeline"], st["store"], st.get("enforcer") or {}
    kinds = pipe.get("by_kind") or {}
    desyncs = st.get("parser_desyncs", 0)
    rows = [
        ("daemon", f"pid {st.get('pid', '?')}, version {st['version']}, host {st['host']}, "
                   f"up {_duration(st['uptime_s'])}"),
        ("guards", f"{st['pinned_links_and_maps']} links and maps pinned (they outlive the daemon)"),
        ("sessions", f"{st['sessions']} live, {st['tracked_processes']} processes tracked"),
        ("events", f"{st['events_per_s']}/s now, {pipe['events']} since start"
                   + (" (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")" if kinds else "")),
        ("lost", f"{pipe['lost']} events in lost records (kernel ring: {st['kernel_lost']}, "
                 f"parser desyncs: {desyncs}, full spool: {store.get('dropped', 0)}); "
                 f"{pipe['malformed']} malformed records"),
        ("store", ("connected" if store["dsn_connected"] else "NOT connected")
                  + f", {store['inserted']} inserted, {store['queued']} queued, spool "
                    f"{store['spool_batches']} batches / {store['spool_bytes']} of "
                    f"{store['spool_max_bytes']} bytes"
                  + (f"; last error: {store['last_error']}" if store.get("last_error") else "")),
        ("verdicts", (", ".join(f"{a} {n}" for a, n in sorted((st.get("verdicts_by_action") or {}).items()))
                      or "none") + (f" ({enf.get('after_the_fact', 0)} after the fact)" if enf else "")),
        ("approvals", f"{st.get('pending_approvals', 0)} pending"),
    ]
    ident = st.get("identity") or {}
    if ident.get("provider"):
        rows.append(("identity", f"{ident['provider']}, {ident['bindings']} people logged in"
                                 + (", required" if ident.get("require") else "")))
    pods = st.get("kubernetes")
    if pods:
        rows.append(("pods", f"{pods['pods']} on node {pods['node']}, API server "
                             + ("connected" if pods["connected"] else
                                f"AWAY ({pods.get('last_error') or '?'}): events keep known pods")))
    for name, text in rows:
        click.echo(f"{name:<10} {text}")
    for w in st.get("warnings") or []:
        click.echo(click.style(f"warning    {w}", fg="yellow"), err=True)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}d {s % 86400 // 3600}h" if s >= 86400 else \
        f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m {s % 60}s"


@main.command()
@config_option
def doctor(config_path: str | None) -> None:
    """Check the kernel features and dependencies the daemon needs."""
    from agentwarden.cli.doctor import checks

    cfg = _load(config_path)
    missing = 0
    for c in checks(cfg):
        mark = click.style("ok ", fg="green") if c.ok else (
            click.style("MISSING", fg="red", bold=True) if c.required else click.style("warn", fg="yellow"))
        line = f"{mark:<8} {c.name:<36} {c.detail}"
        if not c.ok and c.fix:
            line += f"  -> {c.fix}"
        click.echo(line)
        missing += (not c.ok) and c.required
    sys.exit(1 if missing else 0)


@main.command()
@config_option
@event_options
def tail(config_path: str | None, session: str | None, user: str | None, agent: str | None,
         kinds: str | None, pid: int | None, host: str | None, rule: str | None, action: str | None,
         output: str, as_json: bool, color: str) -> None:
    """Follow agent activity live."""
    cfg = _load(config_path)
    client = ControlClient(cfg.control_socket)
    show = Printer(output, as_json, color)
    try:
        for ev in client.stream("tail", session=session, user=user, agent=agent, kinds=_kinds(kinds),
                                pid=pid, host=host, rule=rule, action=action):
            show.with_date = render.spans_days([ev])   # an event of another day says which
            show(ev)
    except ControlError as e:
        click.echo(f"agentwarden: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


@main.command()
@config_option
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sessions(config_path: str | None, limit: int, as_json: bool) -> None:
    """Agent sessions: live ones and those in the audit store."""
    res = _request(config_path, "sessions", limit=limit)
    live = {s["session_id"]: s for s in res["live"]}
    rows = []
    for s in res["stored"]:
        rows.append({
            "session_id": s["session_id"], "agent": s["agent"], "host": s["host"],
            "identity": {"uid": s["uid"], "user": s["user"], "login_user": s["login_user"], "tty": s["tty"],
                         "email": s.get("email") or "", "verified": bool(s.get("verified"))},
            "root_pid": s["root_pid"], "start": format_ts(int(s["start_ns"])),
            "last": format_ts(int(s["last_ns"])), "events": int(s["events"]), "execs": int(s["execs"]),
            "live": s["session_id"] in live,
        })
    stored_ids = {r["session_id"] for r in rows}
    for s in live.values():
        if s["session_id"] not in stored_ids:
            rows.append({"session_id": s["session_id"], "agent": s["agent"], "identity": s["identity"],
                         "root_pid": s["root_pid"], "start": format_ts(int(s["start_ns"])),
                         "events": s["events"], "live": True})
    if res.get("store_error"):
        click.echo(f"agentwarden: warning: {res['store_error']}", err=True)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    click.echo(f"{'SESSION':<17} {'AGENT':<10} {'USER':<14} {'PID':>7} {'STARTED':<24} {'EVENTS':>7}  "
               "STATE  VERIFIED")
    for r in rows:
        ident = r["identity"]
        user = ident.get("user") or "-"
        if ident.get("login_user") and ident["login_user"] != user:
            user = f"{ident['login_user']}>{user}"
        verified = (ident.get("email") or "yes") if ident.get("verified") else "-"
        click.echo(f"{r['session_id']:<17} {r['agent']:<10.10} {user:<14.14} {r['root_pid']:>7} "
                   f"{r['start'][:23]:<24} {r['events']:>7}  {'live' if r['live'] else 'ended':<5}  "
                   f"{render.visible(verified)}")


@main.command()
@config_option
@click.option("--since", help="start: a duration ago (15m, 1h, 7d) or a time")
@click.option("--until", help="end: a duration ago or a time")
@event_options
@click.option("--grep", help="substring of the command line, executable, cwd or SQL (case-insensitive)")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, MAX_LIMIT),
              help="newest N events")
@click.option("--count", "count_only", is_flag=True, help="only count matching events, by kind")
def query(config_path: str | None, since: str | None, until: str | None, session: str | None,
          user: str | None, agent: str | None, kinds: str | None, pid: int | None, host: str | None,
          rule: str | None, action: str | None, output: str, as_json: bool, color: str, grep: str | None,
          limit: int, count_only: bool) -> None:
    """Search the audit store."""
    cfg = _load(config_path)
    req: dict[str, Any] = {"since": _when(since, "--since"), "until": _when(until, "--until"),
                           "session": session, "user": user, "agent": agent, "kinds": _kinds(kinds),
                           "grep": grep, "pid": pid, "host": host, "rule": rule, "action": action,
                           "limit": limit}
    if count_only:
        try:
            counts = ControlClient(cfg.control_socket).request("count", **req)["kinds"]
        except ControlError as e:
            click.echo(f"agentwarden: {e}", err=True)
            sys.exit(1)
        click.echo(json.dumps(counts) if as_json or output != "text"
                   else "\n".join(f"{k:<14} {n}" for k, n in counts.items()))
        return
    events = _events(cfg, req)
    show = Printer(output, as_json, color, with_date=render.spans_days(events))
    for ev in events:
        show(ev)


@main.group()
def policy() -> None:
    """Validate a policy, or replay a recorded session against it."""


def _load_policy(path: str) -> Any:
    from agentwarden.enforce.policy import PolicyError, parse

    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read(), path)
    except OSError as e:
        click.echo(f"agentwarden: {path}: {e.strerror}", err=True)
        sys.exit(2)
    except PolicyError as e:
        click.echo(f"agentwarden: policy error: {e}", err=True)
        sys.exit(2)


@policy.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def policy_check(path: str) -> None:
    """Validate PATH and show, rule by rule, what enforces it and when."""
    from agentwarden.enforce.kernel import compile_policy

    pol = _load_policy(path)
    plan = compile_policy(pol)
    click.echo(f"{path}: {len(pol.rules)} rules, valid")
    for r in pol.rules:
        how, when = plan.mechanisms[r.name]
        kind = r.kind or "any"
        click.echo(f"  line {r.line:<4} {r.name:<32} {r.action:<10} {kind:<8} {how} [{when}]")


@policy.command("reload")
@config_option
def policy_reload(config_path: str | None) -> None:
    """Make the daemon re-read its policy file (as SIGHUP does); an invalid file changes nothing."""
    res = _request(config_path, "policy_reload")
    click.echo(f"policy reloaded: {res['rules']} rules from {res['source']}")


def _request(config_path: str | None, op: str, **args: Any) -> Any:
    cfg = _load(config_path)
    try:
        return ControlClient(cfg.control_socket).request(op, **args)
    except ControlError as e:
        click.echo(f"agentwarden: {e}", err=True)
        sys.exit(1)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON request per line")
def pending(config_path: str | None, as_json: bool) -> None:
    """Operations held for approval (the ones you may decide, unless root or in the control group)."""
    reqs = _request(config_path, "pending")["pending"]
    if as_json:
        for r in reqs:
            click.echo(json.dumps(r))
        return
    if not reqs:
        click.echo("nothing is waiting for approval")
        return
    now = time.time()
    for r in reqs:
        left = max(0, int(r["expires"] - now))
        click.echo(f"{r['id']}  {r['kind']:<5} {r['launcher']:<12} rule {r['rule']}  "
                   f"expires in {left // 60}m{left % 60:02d}s  approvers: {', '.join(r['approvers'])}")
        click.echo(f"    {render.visible(r['summary'][:300])}")


@main.command()
@config_option
@click.argument("request_id")
@click.option("--for", "for_", help="keep allowing the same operation for this long (10m, 1h)")
@click.option("--code", default="", help="the one-time code sent to the approvers (rules with code: true)")
def approve(config_path: str | None, request_id: str, for_: str | None, code: str) -> None:
    """Let a held operation run."""
    for_s = None
    if for_:
        m = _DURATION.match(for_.strip())
        if not m:
            raise click.BadParameter(f"expected a duration like 10m or 1h, got {for_!r}", param_hint="--for")
        for_s = int(float(m.group(1)) * _UNIT[m.group(2)])
    r = _request(config_path, "approve", id=request_id, for_s=for_s, code=code)["request"]
    click.echo(f"approved {r['id']} ({r['kind']}: {r['summary'][:120]})")


@main.command()
@config_option
@click.argument("request_id")
def deny(config_path: str | None, request_id: str) -> None:
    """Refuse a held operation (a held command is killed)."""
    r = _request(config_path, "deny", id=request_id)["request"]
    click.echo(f"denied {r['id']} ({r['kind']}: {r['summary'][:120]})")


@main.command()
@config_option
@click.option("--device", is_flag=True, help="the device grant: a code to enter on another device "
              "(the default without a display or over SSH)")
@click.option("--browser/--no-browser", default=True, show_default=True,
              help="open the login page in a browser (with --no-browser, the URL is printed)")
@click.option("--id-token", "id_token_file", metavar="FILE|-",
              help="an ID token obtained elsewhere (a file, or - for standard input); it must carry a "
                   "nonce from --print-nonce unless the site set require_nonce: false")
@click.option("--print-nonce", is_flag=True,
              help="print a one-time nonce (10 minutes, for your user) and the provider's settings, for "
                   "getting a token with another client; then --id-token")
def login(config_path: str | None, device: bool, browser: bool, id_token_file: str | None,
          print_nonce: bool) -> None:
    """Bind your identity-provider login to your Unix user: the agents you start afterwards carry
    your verified email and groups.  Run it outside any agent (the daemon refuses it inside)."""
    from agentwarden.cli import login as flow

    begin = _request(config_path, "login_begin")
    provider, nonce = begin["provider"], begin["nonce"]
    if print_nonce:
        click.echo(json.dumps({"nonce": nonce, "expires_in": begin["expires_in"], **provider}, indent=2))
        return
    try:
        if id_token_file:
            with click.open_file(id_token_file, encoding="utf-8") as f:
                token, method = f.read().strip(), "id_token"
        elif device or flow.headless():
            token, method = flow.device_flow(provider, nonce, lambda m: click.echo(m, err=True)), "device"
        else:
            token, method = flow.code_flow(provider, nonce, lambda m: click.echo(m, err=True),
                                           open_browser=browser), "code"
    except (flow.LoginError, OSError) as e:
        click.echo(f"agentwarden: {e}", err=True)
        sys.exit(1)
    b = _request(config_path, "login_finish", id_token=token, method=method)["binding"]
    groups = ", ".join(b["groups"]) or ("unknown (the provider did not list them)" if b["groups_unknown"]
                                        else "none")
    click.echo(f"logged in as {b['email'] or b['sub']} ({b['issuer']}); groups: {groups}; "
               f"until {b['expires_at']}")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True)
def whoami(config_path: str | None, as_json: bool) -> None:
    """Who the daemon takes you for: your Unix user and your verified login, if any."""
    res = _request(config_path, "whoami")
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    b = res.get("binding")
    click.echo(f"unix      {res['user']} (uid {res['uid']})")
    if b is None:
        hint = "run `agentwarden login`" if res.get("provider") else "no identity provider is configured"
        click.echo(f"verified  no ({hint})")
        return
    groups = ", ".join(b["groups"]) or ("unknown" if b["groups_unknown"] else "none")
    click.echo(f"verified  {b['email'] or b['sub']} ({b['name']}) from {b['issuer']}")
    click.echo(f"groups    {groups}")
    click.echo(f"until     {b['expires_at']} (bound {b['bound_at']} by {b['method']})")


@main.command()
@config_option
def logout(config_path: str | None) -> None:
    """End your verified login: agents you start afterwards are unverified."""
    b = _request(config_path, "logout")["logged_out"]
    click.echo(f"logged out {b['email'] or b['sub']}" if b else "you were not logged in")


@main.command()
@config_option
@click.argument("session")
def release(config_path: str | None, session: str) -> None:
    """Lift the nftables quarantine of a session."""
    n = _request(config_path, "release", session=session)["released"]
    click.echo(f"released {n} quarantine entries of session {session}" if n else
               f"session {session} was not quarantined")


@policy.command("test")
@config_option
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--session", required=True, help="the recorded session to replay")
@click.option("--json", "as_json", is_flag=True)
def policy_test(config_path: str | None, path: str, session: str, as_json: bool) -> None:
    """Dry run: what PATH would have done to each operation of a recorded session."""
    from agentwarden.core.events import Event
    from agentwarden.core.identity import Groups, person
    from agentwarden.enforce.policy import Parent, decide

    pol = _load_policy(path)
    cfg = _load(config_path)
    if cfg.identity.require:     # as the daemon runs it: its identity rule first
        from agentwarden.enforce.policy import with_identity_rule

        pol = with_identity_rule(pol, cfg.identity.unverified, cfg.identity.hold_timeout_s)
    req: dict[str, Any] = {"session": session, "kinds": ["session_start", "exec", "connect", "sql", "http"],
                           "limit": 100000}
    events = _events(cfg, req)
    if not events:
        click.echo(f"agentwarden: no recorded session {session!r} (`agentwarden sessions` lists them)",
                   err=True)
        sys.exit(1)
    blocked = 0
    # the agent's working directory: where its root process started
    workdir = next((d["process"]["cwd"] for d in events if d["kind"] == "session_start"), "")
    # pid -> what it ran last: an exec's parent.  A record shows neither who could write the file
    # nor what fed standard input: the replay takes the parent at its word
    programs: dict[int, Parent] = {}
    groups = Groups()   # the launching person's, as the daemon takes them: in a sudo session, not root's
    for d in events:
        ev = Event.from_dict(d)
        v = decide(pol, ev, groups.of(person(ev.identity)), workdir, parent=programs.get(ev.process.ppid))
        if ev.kind == "exec":
            programs[ev.process.pid] = Parent(ev.process.exe, list(ev.process.argv), feeds_stdin=True,
                                              direct=True)
        if v.action in ("allow", "audit"):
            continue
        blocked += 1
        if as_json:
            click.echo(json.dumps({"event": d, "action": v.action, "rule": v.rule}))
        else:
            line = render.line(d, render.use_colour("auto", sys.stdout.isatty()))
            click.echo(f"{v.action:<10} {v.rule:<28} {line}")
    if not as_json:
        click.echo(f"{blocked} of {len(events)} operations would have been stopped or held")


@main.command()
@config_option
@click.option("--host", help="the host whose chain to check (default: this daemon's)")
@click.option("--anchor", "anchors", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="checkpoints kept elsewhere (the anchor file, a SIEM's copy): each must be in the chain")
@click.option("--key", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="a trusted public key (PEM); default: the daemon's chain.key_file.pub")
@click.option("--direct", is_flag=True, help="read the store directly (a ClickHouse server, or the embedded "
              "store while the daemon is stopped) instead of through the daemon")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, dir_okay=False),
              help="check a session's bundle (export --format jsonl) instead of the store: no daemon needed")
@click.option("--json", "as_json", is_flag=True)
def verify(config_path: str | None, host: str | None, anchors: tuple[str, ...], keys: tuple[str, ...],
           direct: bool, bundle_path: str | None, as_json: bool) -> None:
    """Check the audit trail's hash chain and signed checkpoints: exit 1 on any sign of tampering
    (a modified, missing, reordered or inserted event, a forged or badly signed checkpoint, a
    truncated tail), naming the first bad seq.  With --bundle: exit 1 on tampering, 3 when an
    event the bundle carries is not yet sealed by a checkpoint, 0 when every one is vouched for."""
    from agentwarden.daemon import chain

    cfg = _load(config_path)
    trusted: dict[str, Any] = {}
    for path in keys or (cfg.chain.key_file + ".pub",):
        try:
            pub = chain.load_public(path)
        except (OSError, ValueError) as e:
            hint = " (an auditor's copy: --key FILE, from `agentwarden key show`)" if bundle_path else ""
            click.echo(f"agentwarden: cannot read the public key {path}: {e}{hint}", err=True)
            sys.exit(2)
        trusted[chain.key_id(pub)] = pub
    if bundle_path:
        _verify_bundle(bundle_path, trusted, as_json)
        return
    target = host or cfg.host
    retention_s = cfg.store.retention_days * 86400.0
    anchored = [cp for path in anchors for cp in chain.read_anchor(path)]
    with _chain_of(cfg, target, direct) as (cps, rows):
        rep = chain.verify(target, rows, cps, trusted, anchored, retention_s)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
    else:
        click.echo(f"host {render.visible(target)}: {rep.events} events, seq {rep.first_seq}-{rep.last_seq}, "
                   f"{rep.checkpoints} checkpoints, sealed to seq {rep.sealed_to}")
        _findings(rep.findings)
        click.echo(f"first bad seq: {rep.first_bad()}" if rep.tampered else "the chain is intact")
    sys.exit(1 if rep.tampered else 0)


def _findings(findings: list[Any]) -> None:
    """A finding's detail names what the store or the file holds (a host, a key id): an escape
    sequence in it must not rewrite the verdict on the auditor's terminal."""
    for f in findings:
        mark = click.style("TAMPERED", fg="red", bold=True) if f.severity == "tamper" else "info    "
        click.echo(f"{mark} {f.kind:<14} seq {f.seq}: {render.visible(f.detail)}")


def _verify_bundle(path: str, trusted: dict[str, Any], as_json: bool) -> None:
    from agentwarden.daemon import bundle

    try:
        with open(path, encoding="utf-8") as src:
            rep = bundle.verify(bundle.read(src), trusted)
    except Exception as e:     # whatever the file holds, never a traceback and never a pass
        click.echo(f"agentwarden: {path}: not a readable bundle: {render.visible(str(e))[:300]}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
    else:
        click.echo(f"bundle of session {render.visible(rep.session)}, host {render.visible(rep.host)}: "
                   f"{rep.events} events, seq {rep.first_seq}-{rep.last_seq}, {rep.checkpoints} checkpoints, "
                   f"{rep.vouched} vouched for by a trusted signature")
        _findings(rep.findings)
        click.echo(f"first bad seq: {rep.first_bad()}" if rep.tampered else
                   "every event is in the signed chain, unaltered" if rep.complete else
                   "no tampering found, but not every event is sealed yet")
    sys.exit(1 if rep.tampered else 0 if rep.complete else 3)


@contextlib.contextmanager
def _chain_of(cfg: config_mod.Config, host: str, direct: bool,
              from_seq: int = 0) -> Iterator[tuple[list[Any], Iterator[Any]]]:
    """A host's checkpoints (read first: the rows read after include what they sign) and its chain
    rows in seq order from from_seq, streamed: through the daemon, or (direct) from the store
    itself.  A store or daemon error exits 2."""
    from agentwarden.daemon import chain

    if direct:
        from agentwarden.daemon.store import Store, StoreError

        store = Store.from_config(config_mod.resolve_dsn(cfg).store)
        try:
            store.connect()
            yield store.checkpoints(host), store.chain_rows(host, start=from_seq)
        except StoreError as e:
            click.echo(f"agentwarden: {e}", err=True)
            sys.exit(2)
        finally:
            store.close()
        return
    try:
        lines = ControlClient(cfg.control_socket, timeout=None).stream("chain", host=host, from_seq=from_seq)
        signed: list[chain.Checkpoint] = []
        first = next(lines, None)
        while first is not None and "checkpoint" in first:
            signed.append(chain.Checkpoint.from_json(first["checkpoint"]))
            first = next(lines, None)

        def rows() -> Iterator[chain.Row]:    # streamed: a large chain is not held
            line = first
            while line is not None:
                if "row" in line:
                    seq, prev, h, values, kind, reason = line["row"]
                    yield (seq, prev, h, values, kind, reason)
                line = next(lines, None)
        yield signed, rows()
    except ControlError as e:
        click.echo(f"agentwarden: {e} (--direct reads the store itself)", err=True)
        sys.exit(2)


@main.command()
@config_option
@click.argument("session")
@click.option("--play", is_flag=True, help="pace the lines by the real time between the events")
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(0.01, 1000),
              help="with --play: how many times faster than it happened")
@click.option("--max-idle", default=2.0, show_default=True, type=click.FloatRange(0, 3600),
              help="with --play: the longest pause, in seconds")
@click.option("--follow", is_flag=True, help="then follow the session live")
@click.option("--kind", "kinds", help="only these kinds (comma-separated)")
@click.option("--verdict", "verdict", type=click.Choice(list(ACTIONS) + ["resume"]),
              help="only verdicts of this action")
@click.option("--pid", type=int, help="only this process")
@click.option("--json", "as_json", is_flag=True, help="the events, one JSON object a line")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True)
def replay(config_path: str | None, session: str, play: bool, speed: float, max_idle: float, follow: bool,
           kinds: str | None, verdict: str | None, pid: int | None, as_json: bool, color: str) -> None:
    """A session as a timeline: who, what, when, and what the policy did, in order."""
    from agentwarden.cli import replay as rp

    cfg = _load(config_path)
    req: dict[str, Any] = {"session": session, "limit": MAX_LIMIT}
    events = _events(cfg, req)
    if not events and not follow:
        click.echo(f"agentwarden: no events of session {session}", err=True)
        sys.exit(1)
    wanted = tuple(_kinds(kinds) or ())
    shown = rp.keep(events, wanted, verdict or "", pid or 0)
    if as_json:
        for ev in shown:
            click.echo(json.dumps(ev, ensure_ascii=False))
    else:
        colour = render.use_colour(color, sys.stdout.isatty())
        for line in rp.header(events, colour):
            click.echo(line)
        lines = list(rp.body(shown, colour)) if shown else []
        waits = rp.pacing([off for off, _ in lines], speed, max_idle) if play else [0.0] * len(lines)
        for (_, line), wait in zip(lines, waits, strict=True):
            if wait:
                time.sleep(wait)
            click.echo(line)
    if follow:
        seen = {e.get("event_id") for e in events}
        try:
            live = ControlClient(cfg.control_socket).stream("tail", session=session,
                                                            kinds=list(wanted) or None, pid=pid)
            for ev in live:
                action = (ev.get("verdict") or {}).get("action")
                if ev.get("event_id") in seen or (verdict and action != verdict):
                    continue
                click.echo(json.dumps(ev, ensure_ascii=False) if as_json else render.line(ev, colour=False))
        except (ControlError, KeyboardInterrupt):
            pass


SESSION_FORMATS = ("jsonl", "asciicast", "csv", "pcap")


@main.command("export")
@config_option
@click.argument("session_arg", metavar="[SESSION]", required=False)
@click.option("--since", help="start: a duration ago (15m, 1h, 7d) or a time")
@click.option("--until", help="end: a duration ago or a time")
@click.option("--session", help="only this session (or give it as the argument)")
@click.option("--format", "fmt", type=click.Choice(["json", "ocsf", "cef", *SESSION_FORMATS]), default="json",
              show_default=True, help="json, ocsf, cef: one record a line; of one session: jsonl (a bundle "
              "`verify --bundle` checks), asciicast (asciinema v2), csv, pcap (reconstructed, pcapng)")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="write this file (made 0600; pcap needs one) instead of standard output")
@click.option("--direct", is_flag=True, help="jsonl: read the chain from the store itself, not the daemon")
@click.option("--limit", default=MAX_LIMIT, show_default=True, type=click.IntRange(1, MAX_LIMIT))
def export_cmd(config_path: str | None, session_arg: str | None, since: str | None, until: str | None,
               session: str | None, fmt: str, output: str | None, direct: bool, limit: int) -> None:
    """A one-off dump (the configured sinks export continuously), or one session in a format an
    auditor's tools read."""
    from agentwarden.daemon import export

    cfg = _load(config_path)
    session = session_arg or session
    if fmt in SESSION_FORMATS and not session:
        click.echo(f"agentwarden: --format {fmt} exports one session: name it", err=True)
        sys.exit(2)
    if fmt == "pcap" and not output:
        click.echo("agentwarden: a pcap is binary: write it to a file with -o FILE", err=True)
        sys.exit(2)
    req: dict[str, Any] = {"since": _when(since, "--since"), "until": _when(until, "--until"),
                           "session": session, "limit": limit}
    events = _events(cfg, req)
    events.sort(key=lambda e: (parse_ts(e["ts"]), int((e.get("chain") or {}).get("seq") or 0)))
    if fmt in SESSION_FORMATS:
        if not events:
            click.echo(f"agentwarden: no events of session {session}", err=True)
            sys.exit(1)
        if len(events) >= limit:
            click.echo(f"agentwarden: session {session} has {limit} events or more, past what one export "
                       f"reads (--limit, at most {MAX_LIMIT}): refused rather than cut", err=True)
            sys.exit(2)
    if fmt == "pcap":
        from agentwarden.cli import pcap

        assert output
        with _private_output(output, binary=True) as f:
            n = pcap.write(events, f"/proc/self/fd/{f.fileno()}")   # scapy opens by name: this very file
        click.echo(f"{n} packets reconstructed from {len(events)} events written to {output}", err=True)
        return
    with _private_output(output) if output else contextlib.nullcontext(sys.stdout) as out:
        if fmt == "jsonl":
            _write_bundle(cfg, session or "", events, direct, out)
        elif fmt == "asciicast":
            from agentwarden.cli import replay as rp

            for line in rp.asciicast(events):
                out.write(line + "\n")
        elif fmt == "csv":
            import csv

            from agentwarden.cli import replay as rp

            csv.writer(out).writerows(rp.csv_rows(events))
        else:
            for ev in events:
                out.write(export.render(fmt, ev) + "\n")


@contextlib.contextmanager
def _private_output(path: str, binary: bool = False) -> Iterator[Any]:
    """A file for an export: the trail is readable by root and the agentwarden group only, and so
    is what is taken out of it.  Written to a new file of its own (0600, O_EXCL) beside the target
    and renamed over it once whole: never through a symlink or into a file someone else made
    and may still hold open; an export that fails leaves nothing half written."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".agentwarden-export-")
    except OSError as e:
        click.echo(f"agentwarden: cannot write in {directory}: {e}", err=True)
        sys.exit(2)
    try:
        f: Any = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")
        with f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        click.echo(f"agentwarden: cannot write {path}: {e}", err=True)
        sys.exit(2)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_bundle(cfg: config_mod.Config, session: str, events: list[dict[str, Any]], direct: bool,
                  out: Any) -> None:
    from agentwarden.daemon import bundle, chain

    seqs = [int(e["chain"]["seq"]) for e in events if e.get("chain") and e["chain"].get("seq")]
    if not seqs:
        click.echo(f"agentwarden: session {session}'s events are not chained (recorded before the chain, "
                   "or chain.enabled is false): no bundle can vouch for them", err=True)
        sys.exit(1)
    host = str(events[0].get("host") or cfg.host)
    keys: dict[str, str] = {}
    try:
        pub = chain.load_public(cfg.chain.key_file + ".pub")
        keys[chain.key_id(pub)] = chain.public_pem(pub)
    except (OSError, ValueError):
        pass                  # the reader brings the key it trusts; this one is only informative
    with _chain_of(cfg, host, direct, from_seq=min(seqs)) as (cps, rows):
        for rec in bundle.build(host, session, rows, cps, keys, min(seqs), max(seqs)):
            out.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")


@main.group()
def key() -> None:
    """The chain's signing key."""


@key.command("show")
@config_option
def key_show(config_path: str | None) -> None:
    """The public key that verifies this host's checkpoints (give it to the auditors)."""
    from agentwarden.daemon import chain

    cfg = _load(config_path)
    path = cfg.chain.key_file + ".pub"
    try:
        pub = chain.load_public(path)
    except (OSError, ValueError) as e:
        click.echo(f"agentwarden: cannot read {path}: {e} (the daemon makes it at its first start)", err=True)
        sys.exit(1)
    click.echo(f"# key id {chain.key_id(pub)}, host {cfg.host}")
    click.echo(chain.public_pem(pub), nl=False)


def _events(cfg: config_mod.Config, req: dict[str, Any]) -> list[dict[str, Any]]:
    """Events through the daemon; from the store itself when the daemon is not running."""
    try:
        events: list[dict[str, Any]] = ControlClient(cfg.control_socket).request("query", **req)["events"]
    except ControlError as e:
        if "cannot reach the daemon" not in str(e):
            click.echo(f"agentwarden: {e}", err=True)
            sys.exit(1)
        events = _query_store_directly(cfg, req)
    return events


def _query_store_directly(cfg: config_mod.Config, req: dict[str, Any]) -> list[dict[str, Any]]:
    """The daemon is down: read the store ourselves (chdb allows one process at a time)."""
    from agentwarden.daemon.query import EventQuery, QueryError
    from agentwarden.daemon.store import Store, StoreError

    try:
        cfg = config_mod.resolve_dsn(cfg)
    except config_mod.ConfigError as e:
        click.echo(f"agentwarden: config error: {e}", err=True)
        sys.exit(2)
    store = Store.from_config(cfg.store)
    try:
        store.connect()
        return [e.to_dict() for e in store.query(EventQuery.from_request(req))]
    except (StoreError, QueryError) as e:
        click.echo(f"agentwarden: {e}", err=True)
        sys.exit(1)
    finally:
        store.close()


if __name__ == "__main__":
    main()
