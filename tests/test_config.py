"""Config: defaults, every field validated, errors name the field and its line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from agentwarden.daemon.config import Config, ConfigError, load, parse


def test_empty_config_gives_defaults() -> None:
    cfg = parse("")
    assert cfg.store.dsn == "chdb:///var/lib/agentwarden/audit"
    assert cfg.control_socket == "/run/agentwarden/agentwarden.sock"
    assert cfg.store.batch.size == 5000 and cfg.store.retention_days == 90
    assert cfg.agents == () and cfg.builtin_agents


def test_full_config() -> None:
    cfg = parse("""
agents:
  - name: claude
    match: {comm: [claude], cmdline: ["claude( |$)"]}
  - name: aider
    match: {exe: ["/usr/local/bin/aider"]}
store:
  dsn: https://writer:secret@ch.example:8443/audit
  retention_days: 30
  batch: {size: 50, interval: 0.5}
control_socket: /tmp/x.sock
""")
    assert [a.name for a in cfg.agents] == ["claude", "aider"]
    assert cfg.store.database == "audit"      # taken from the DSN path
    assert cfg.store.batch.interval == 0.5
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("text, field, line", [
    ("store:\n  batch:\n    size: -1\n", "store.batch.size", 3),
    ("store:\n  queue_max: 1000\n", "store.queue_max", 2),      # under two batches: it would only spool
    ("store:\n  dsn: mysql://x\n", "store.dsn", 2),
    ("store:\n  retention: 3\n", "store.retention", 2),
    ("agents:\n  - name: x\n    match: {cmdline: ['(']}\n", "agents[0].match.cmdline[0]", 3),
    ("agents:\n  - name: x\n    match: {exe: ['/opt/*/x*']}\n", "agents[0].match", 3),
    ("agents:\n  - name: x\n    match: {comm: [a-very-long-command-name]}\n", "agents[0].match.comm[0]", 3),
    ("agents:\n  - {name: a, match: {comm: [a]}}\n  - {name: a, match: {comm: [b]}}\n", "agents[1].name", 3),
    ("log_level: loud\n", "log_level", 1),
    ("llm:\n  max_text: -5\n", "llm.max_text", 2),
    ("llm:\n  hash_only: sometimes\n", "llm.hash_only", 2),
    ("llm:\n  keep: all\n", "llm.keep", 2),
    ("control_socket: relative.sock\n", "control_socket", 1),
    ("probes:\n  argv_total_bytes: 10000\n", "probes.argv_total_bytes", 2),
    ("agents: {name: x}\n", "agents", 1),
])
def test_errors_name_the_field_and_line(text: str, field: str, line: int) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text, "cfg.yaml")
    assert e.value.field == field
    assert e.value.line == line
    assert str(e.value).startswith(f"cfg.yaml:{line}: {field}: ")


def test_yaml_syntax_error_has_a_line() -> None:
    with pytest.raises(ConfigError) as e:
        parse("store:\n  dsn: [unclosed\n")
    assert e.value.line is not None and "not valid YAML" in str(e.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("command", [["daemon"], ["doctor"], ["query"], ["tail"], ["sessions"]])
def test_cli_bad_config_exits_2_naming_the_field(tmp_path: Path, command: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("store:\n  batch: {size: lots}\n")
    res = subprocess.run([sys.executable, "-m", "agentwarden.cli.main", *command, "--config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "store.batch.size" in res.stderr and f"{bad}:2" in res.stderr


def test_env_var_selects_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("log_level: 7\n")
    res = subprocess.run([sys.executable, "-m", "agentwarden.cli.main", "sessions"], capture_output=True,
                         text=True, timeout=60, env={"AGENTWARDEN_CONFIG": str(bad), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and "log_level" in res.stderr


def test_nice_is_validated() -> None:
    assert parse("nice: 0\n").nice == 0
    with pytest.raises(ConfigError, match="nice"):
        parse("nice: -40\n")
