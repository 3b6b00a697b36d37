"""The Grafana dashboard and data source provisioning, rendered from the panels below.

    python3 deploy/grafana/render.py    (writes agentwarden-dashboard.json and datasource.yaml here)

The data source is the official ClickHouse plugin (grafana-clickhouse-datasource).  Every
panel's SQL uses the plugin's macros ($__timeFilter, $__timeInterval, $__conditionalAll) and
the dashboard's variables ($database, $table, $user), so one dashboard serves any database
and table name.  tests/test_grafana.py keeps the files equal to this render, expands the
macros the way the plugin does, and runs every panel's SQL against a store a real daemon
recorded (commands, SQL, HTTP, a denial, an approval, a loss): each must return rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PLUGIN = "grafana-clickhouse-datasource"
DS = {"type": PLUGIN, "uid": "${datasource}"}
SOURCE = "${database}.${table}"
WHERE = "$__timeFilter(ts) AND $__conditionalAll(identity_user IN (${user:singlequote}), $user)"
PERSON = "if(identity_login_user != '', identity_login_user, identity_user)"

# title, panel type, format (0 time series, 1 table), SQL, grid (w, h)
PANELS: list[tuple[str, str, int, str, tuple[int, int]]] = [
    ("Events by kind", "timeseries", 0,
     f"SELECT $__timeInterval(ts) AS time, kind, count() AS events FROM {SOURCE} WHERE {WHERE} "
     "GROUP BY time, kind ORDER BY time", (24, 8)),
    ("Sessions by person", "table", 1,
     f"SELECT {PERSON} AS person, uniqExact(session_id) AS sessions, countIf(kind = 'exec') AS commands, "
     "countIf(kind = 'sql') AS statements, countIf(kind = 'http') AS requests, "
     "countIf(kind = 'verdict' AND verdict_action IN ('deny', 'kill', 'quarantine', 'hold')) AS stopped "
     f"FROM {SOURCE} WHERE {WHERE} AND session_id != '' GROUP BY person ORDER BY sessions DESC", (12, 8)),
    ("Verdicts by rule and action", "table", 1,
     "SELECT verdict_rule AS rule, verdict_action AS action, count() AS verdicts, "
     "countIf(verdict_prevented) AS prevented, max(ts) AS last "
     f"FROM {SOURCE} WHERE {WHERE} AND kind = 'verdict' GROUP BY rule, action ORDER BY verdicts DESC",
     (12, 8)),
    ("Approvals by rule and state", "table", 1,
     "SELECT approval_rule AS rule, approval_state AS state, count() AS requests, "
     "groupUniqArray(approval_decided_by) AS decided_by, max(ts) AS last "
     f"FROM {SOURCE} WHERE {WHERE} AND kind = 'approval' GROUP BY rule, state ORDER BY last DESC", (12, 8)),
    ("Lost events", "timeseries", 0,
     f"SELECT $__timeInterval(ts) AS time, lost_reason AS reason, sum(lost_count) AS lost FROM {SOURCE} "
     "WHERE $__timeFilter(ts) AND kind = 'lost' GROUP BY time, reason ORDER BY time", (12, 8)),
    ("SQL by command and database", "table", 1,
     "SELECT sql_database AS database, sql_command AS command, count() AS statements, "
     "countIf(sql_sqlstate != '') AS errors, round(avg(sql_duration_ms), 2) AS avg_ms "
     f"FROM {SOURCE} WHERE {WHERE} AND kind = 'sql' GROUP BY database, command ORDER BY statements DESC "
     "LIMIT 200", (12, 8)),
    ("HTTP by host and status", "table", 1,
     "SELECT http_host AS host, http_status AS status, count() AS requests, "
     "groupUniqArray(10)(http_method) AS methods "
     f"FROM {SOURCE} WHERE {WHERE} AND kind = 'http' GROUP BY host, status ORDER BY requests DESC LIMIT 200",
     (12, 8)),
    ("Sessions", "table", 1,
     f"SELECT session_id, any(agent) AS agent, any(host) AS host, any({PERSON}) AS person, "
     "min(ts) AS started, max(ts) AS last, countIf(kind = 'exec') AS commands, "
     "countIf(kind = 'verdict') AS verdicts "
     f"FROM {SOURCE} WHERE {WHERE} AND session_id != '' GROUP BY session_id ORDER BY started DESC LIMIT 200",
     (24, 8)),
    ("Commands", "table", 1,
     f"SELECT ts, host, {PERSON} AS person, agent, session_id, process_pid AS pid, "
     "arrayStringConcat(process_argv, ' ') AS command, process_cwd AS cwd, exec_errno AS errno "
     f"FROM {SOURCE} WHERE {WHERE} AND kind = 'exec' ORDER BY ts DESC LIMIT 1000", (24, 10)),
]


def dashboard() -> dict[str, Any]:
    panels = []
    x = y = row_h = 0
    for i, (title, kind, fmt, sql, (w, h)) in enumerate(PANELS, 1):
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        panels.append({
            "id": i, "title": title, "type": kind, "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "targets": [{"refId": "A", "datasource": DS, "editorType": "sql", "queryType": "sql",
                         "format": fmt, "rawSql": sql}],
        })
        x, row_h = x + w, max(row_h, h)
    return {
        "title": "agentwarden",
        "uid": "agentwarden",
        "description": "What AI coding agents did, by person: commands, SQL, HTTP, verdicts, approvals, "
                       "losses",
        "schemaVersion": 39,
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": PLUGIN},
            {"name": "database", "type": "textbox", "query": "agentwarden",
             "current": {"value": "agentwarden"}},
            {"name": "table", "type": "textbox", "query": "events", "current": {"value": "events"}},
            {"name": "user", "type": "query", "datasource": DS, "includeAll": True, "multi": True,
             "query": f"SELECT DISTINCT identity_user FROM {SOURCE} WHERE $__timeFilter(ts)"},
        ]},
        "panels": panels,
    }


DATASOURCE = """\
# Grafana provisioning (/etc/grafana/provisioning/datasources/): the official ClickHouse plugin
# (grafana-cli plugins install grafana-clickhouse-datasource) reading agentwarden's store.  A
# read-only ClickHouse user; the embedded chdb store is per host: use a ClickHouse server
# (store.dsn) for a dashboard over a fleet.
apiVersion: 1
datasources:
  - name: agentwarden
    type: grafana-clickhouse-datasource
    jsonData:
      host: clickhouse.example
      port: 9000
      protocol: native
      username: agentwarden_reader
      defaultDatabase: agentwarden
    secureJsonData:
      password: $AGENTWARDEN_CLICKHOUSE_PASSWORD
"""


def main() -> None:
    (HERE / "agentwarden-dashboard.json").write_text(json.dumps(dashboard(), indent=2) + "\n")
    (HERE / "datasource.yaml").write_text(DATASOURCE)
    sys.stdout.write(f"wrote {HERE / 'agentwarden-dashboard.json'} and {HERE / 'datasource.yaml'}\n")


if __name__ == "__main__":
    main()
