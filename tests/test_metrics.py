"""Prometheus /metrics and /healthz: scraped from a real daemon, and the endpoint's answers."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from agentwarden.daemon.metrics import Metrics
from conftest import Daemon, make_agent, need_root, wait_for
from pgserver import free_port
from prometheus_client.parser import text_string_to_metric_families

COMM = "aw-metric-agent"


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_a_scrape_shows_what_the_daemon_saw(tmp_path: Path) -> None:
    need_root()
    port = free_port()
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", [{"name": "metric", "match": {"comm": [COMM]}}])
    cfg = json.loads(d.config.read_text())
    cfg["metrics"] = {"listen": f"127.0.0.1:{port}"}
    d.config.write_text(json.dumps(cfg))
    agent = make_agent(tmp_path / "bin", COMM)
    d.start()
    try:
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/healthz", timeout=10) as r:
            assert r.status == 200 and r.read().decode().startswith("ok")
        import subprocess

        subprocess.run([str(agent), "-c", "for i in $(seq 150); do /bin/true; done"], check=True, timeout=120)

        def enough() -> Any:
            m = scrape(base + "/metrics")
            execs = m.get("agentwarden_events_total", {}).get((("kind", "exec"),), 0)
            return m if execs >= 150 else None

        m = wait_for(enough, 60, what="150 exec events in the metrics")
        assert m["agentwarden_sessions"][()] >= 0 and m["agentwarden_pinned_links_and_maps"][()] > 10
        assert m["agentwarden_kernel_lost_total"][()] == 0 and m["agentwarden_store_dropped_total"][()] == 0
        assert m["agentwarden_events_total"][(("kind", "session_start"),)] >= 1
        stages = {dict(k)["stage"] for k, v in m["agentwarden_stage_seconds_count"].items() if v > 0}
        assert {"capture", "sinks", "masker"} <= stages, stages      # 1 record in 64 is timed
        status = d.request("status")
        assert m["agentwarden_store_inserted_total"][()] <= status["store"]["inserted"]
    finally:
        d.stop()


def _call(app: Any, path: str) -> tuple[str, bytes]:
    got: list[str] = []
    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""},
                        lambda status, headers: got.append(status)))
    return got[0], body


def test_healthz_is_503_with_the_reason_when_the_trail_cannot_be_kept() -> None:
    m = Metrics(lambda: {}, lambda: (False, "the store is unreachable and the spool is full"))
    status, body = _call(m.app, "/healthz")
    assert status.startswith("503") and b"spool is full" in body
    status, _ = _call(m.app, "/nothing")
    assert status.startswith("404")


def test_a_wrong_listen_address_is_a_config_error() -> None:
    from agentwarden.daemon.config import ConfigError, parse

    for bad in ("9464", "127.0.0.1:http", "127.0.0.1:70000"):
        try:
            parse(f"metrics: {{listen: '{bad}'}}\n")
        except ConfigError as e:
            assert "metrics.listen" in str(e)
        else:
            raise AssertionError(f"{bad!r} was taken")
    assert parse("metrics: {listen: ''}\n").metrics_listen == ""

