"""The Grafana dashboard: the checked-in files are the render, and every panel's SQL, with the
ClickHouse plugin's macros expanded as the plugin expands them, returns rows from a store that
a real daemon recorded: commands, SQL (a denied DROP TABLE), HTTP, a held command a person
approved, a loss."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from conftest import Daemon, load_script, make_agent, need_root, wait_for
from pgserver import PgServer

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "deploy" / "grafana"
COMM = "aw-graf-agent"
POLICY = """version: 1
rules:
  - name: no-drop-table
    when: {kind: sql, sql: {command: ["DROP TABLE"]}}
    action: deny
  - name: deny-marker
    when: {kind: exec, exec: {argv: ['aw-graf-denied']}}
    action: deny
  - name: hold-touch
    when: {kind: exec, exec: {path: ["*/touch"], argv: ['held-']}}
    action: hold
    approvers: [self]
    timeout: 5m
"""


RENDER = load_script(GRAFANA / "render.py", "grafana_render")


def test_the_checked_in_dashboard_is_the_render() -> None:
    assert json.loads((GRAFANA / "agentwarden-dashboard.json").read_text()) == RENDER.dashboard(), \
        "run: python3 deploy/grafana/render.py"
    assert (GRAFANA / "datasource.yaml").read_text() == RENDER.DATASOURCE


def _call_args(sql: str, name: str) -> Iterator[tuple[int, int, list[str]]]:
    """Each `name(...)` in sql: (start, end, its top-level arguments)."""
    pos = 0
    while (start := sql.find(name + "(", pos)) >= 0:
        depth, args, cur, i = 0, [], "", start + len(name)
        while True:
            ch = sql[i]
            if ch == "(":
                depth += 1
                if depth == 1:
                    i += 1
                    continue
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    args.append(cur.strip())
                    break
            elif ch == "," and depth == 1:
                args.append(cur.strip())
                cur, i = "", i + 1
                continue
            cur += ch
            i += 1
        yield start, i + 1, args
        pos = i + 1


def expand(sql: str, since: int, until: int, users: list[str] | None) -> str:
    """The plugin's macros (ClickHouse's Grafana docs) and the dashboard's variables; users None
    is "All"."""
    for name, make in (
        ("$__conditionalAll", lambda a: "1=1" if users is None else a[0]),
        ("$__timeFilter", lambda a: f"{a[0]} >= toDateTime({since}) AND {a[0]} <= toDateTime({until})"),
        ("$__timeInterval", lambda a: f"toStartOfInterval(toDateTime({a[0]}), INTERVAL 60 second)"),
    ):
        while True:
            found = next(_call_args(sql, name), None)
            if found is None:
                break
            start, end, args = found
            sql = sql[:start] + make(args) + sql[end:]
    quoted = ",".join("'" + u.replace("'", "\\'") + "'" for u in users or [""])
    sql = sql.replace("${user:singlequote}", quoted).replace("${database}", "agentwarden")
    sql = sql.replace("${table}", "events")
    assert "$" not in sql, sql
    return sql


class Web(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_: Any) -> None:
        pass


GARBAGE = ("import socket, sys\n"
           "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
           "s.sendall(b'GET /first HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n')\n"
           "s.recv(4096)\n"
           "s.sendall(b'\\x01\\x02 this is no request\\r\\n\\r\\n')\n"
           "s.close()\n")

QUERY = ("import json, sys, clickhouse_connect\n"
         "c = clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1])\n"
         "print(json.dumps([len(c.query(q).result_rows) for q in json.load(sys.stdin)]))\n")


def test_every_panel_returns_rows_from_a_recorded_session(tmp_path: Path) -> None:
    need_root()
    pg = PgServer()
    pg.start()
    web = ThreadingHTTPServer(("127.0.0.1", 0), Web)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", [{"name": "graf", "match": {"comm": [COMM]}}], policy=POLICY)
    agent = make_agent(tmp_path / "bin", COMM)
    (tmp_path / "garbage.py").write_text(GARBAGE)
    since = int(time.time()) - 60
    try:
        pg.psql("awtest", "create table graf (a int)")
        d.start()
        port = web.server_address[1]
        psql = f"{pg.bin}/psql -X -h 127.0.0.1 -p {pg.port} -U postgres -d awtest"
        script = (f"{psql} -c 'select 1'; {psql} -c 'drop table graf'; curl -s http://127.0.0.1:{port}/page; "
                  f"{sys.executable} {tmp_path}/garbage.py {port}; touch {tmp_path}/aw-graf-denied; "
                  f"touch {tmp_path}/held-1; true")
        subprocess.run([str(agent), "-c", script], capture_output=True, text=True, timeout=120,
                       start_new_session=True)
        req = wait_for(lambda: next(iter(d.request("pending")["pending"]), None), what="the held touch")
        assert d.cli_as_person("approve", req["id"]).returncode == 0
        wanted = {"exec", "sql", "http", "verdict", "approval", "lost"}

        def recorded() -> bool:
            kinds = d.request("count", kinds=[], since=None)["kinds"]
            approved = any(e["approval"]["state"] == "approved" for e in d.events(kinds=["approval"]))
            return wanted <= set(kinds) and approved

        wait_for(recorded, 60, what=f"{wanted} in the store")
        assert pg.psql("awtest", "select count(*) from graf").strip() == "0"   # the DROP never ran
    finally:
        d.stop()
        web.shutdown()
        pg.stop()
    until = int(time.time()) + 60
    panels = RENDER.dashboard()["panels"]
    user_query = next(v for v in RENDER.dashboard()["templating"]["list"] if v["name"] == "user")["query"]
    queries = [expand(p["targets"][0]["rawSql"], since, until, users) for users in (None, ["root"])
               for p in panels] + [expand(user_query, since, until, None)]
    out = subprocess.run([sys.executable, "-c", QUERY, str(d.store_path)], input=json.dumps(queries),
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = json.loads(out)
    titles = [p["title"] for p in panels] * 2 + ["variable user"]
    empty = [t for t, n in zip(titles, rows, strict=True) if n == 0]
    assert not empty, f"panels without rows: {empty}"
    assert re.search(r"\$__timeInterval\(ts\)", json.dumps(RENDER.dashboard()))   # buckets follow the zoom
