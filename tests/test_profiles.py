from __future__ import annotations

from agentwarden.daemon.config import parse
from agentwarden.daemon.profiles import Profiles


def profiles(text: str, builtin: bool = True) -> Profiles:
    cfg = parse(text)
    return Profiles(cfg.agents, builtin)


def test_builtin_cursor_profile() -> None:
    p = profiles("")
    assert p.match("cursor", "/usr/share/cursor/cursor", ["/usr/share/cursor/cursor"]).name == "cursor"
    assert p.match("cursor-agent", "/usr/bin/bash", ["bash", "cursor-agent"]).name == "cursor"
    assert p.match("code", "/usr/share/code/code", []) is None
    assert dict(p.comm_table()).keys() == {"cursor", "Cursor", "cursor-agent"}


def test_exe_and_cmdline_must_also_match() -> None:
    p = profiles("""
agents:
  - name: claude
    match: {comm: [node], cmdline: ['claude-code/cli\\.js']}
  - name: aider
    match: {exe: ['/opt/aider/bin/aider']}
""", builtin=False)
    assert p.match("node", "/usr/bin/node", ["node", "/usr/lib/node_modules/claude-code/cli.js"]).name == "claude"
    assert p.match("node", "/usr/bin/node", ["node", "server.js"]) is None
    assert p.match("aider", "/opt/aider/bin/aider", []).name == "aider"
    assert p.match("aider", "/home/x/aider", []) is None
    assert sorted(c for c, _ in p.comm_table()) == ["aider", "node"]


def test_configured_profile_replaces_builtin_of_same_name() -> None:
    p = profiles("agents:\n  - {name: cursor, match: {comm: [my-cursor]}}\n")
    assert [x.name for x in p.items] == ["cursor"]
    assert p.match("cursor", "/x/cursor", []) is None


def test_kernel_comm_is_truncated_like_the_kernel() -> None:
    cfg = parse("agents:\n  - {name: x, match: {exe: ['/opt/a-really-long-binary-name']}}\n")
    assert cfg.agents[0].match.kernel_comms() == {"a-really-long-b"}
    p = Profiles(cfg.agents, builtin=False)
    assert p.match("a-really-long-b", "/opt/a-really-long-binary-name", []).name == "x"


def test_a_profile_scoped_to_pods_by_namespace_and_label() -> None:
    from agentwarden.core.events import K8sInfo

    p = profiles("""
agents:
  - name: ci-agent
    match: {comm: [claude], namespaces: ['ci-*'], labels: {app: coder}}
  - name: anywhere
    match: {comm: [claude]}
""", builtin=False)
    ci = K8sInfo(namespace="ci-main", labels={"app": "coder", "x": "y"})
    assert p.match("claude", "/usr/bin/claude", [], ci).name == "ci-agent"
    assert p.match("claude", "/usr/bin/claude", [], K8sInfo(namespace="ci-main", labels={"app": "web"})).name \
        == "anywhere"
    assert p.match("claude", "/usr/bin/claude", [], K8sInfo(namespace="prod", labels={"app": "coder"})).name \
        == "anywhere"
    assert p.match("claude", "/usr/bin/claude", []).name == "anywhere"     # not in a pod
    assert p.pod_comms == {"claude"}
