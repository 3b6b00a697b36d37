"""Real probes, real processes: a fake agent's commands reach the store and tail."""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import Daemon, wait_for

SCRIPT = r"""
/bin/echo plain-marker
ls / | grep -c usr
/nonexistent/aw-missing-cmd
( setsid sh -c 'sleep 0.3; /bin/true bg-done' & )
su -s /bin/sh {user} -c '/usr/bin/id -u'
setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/id -u
sh -c 'exit 7'
sh -c 'kill -9 $$'
sleep 0.6
exit 3
"""


def run_agent(agent: Path, script: str, login_uid: int | None = None) -> subprocess.Popen[str]:
    """Start the agent the way a login shell would, optionally with an audit loginuid."""
    prefix = f"echo {login_uid} > /proc/self/loginuid; " if login_uid is not None else ""
    return subprocess.Popen(["/bin/sh", "-c", f'{prefix}exec "$0" -c "$1"', str(agent), script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def session_of(daemon: Daemon, pid: int) -> str:
    def find() -> str | None:
        for ev in daemon.events(kinds=["session_start"]):
            if ev["process"]["pid"] == pid:
                return str(ev["session_id"])
        return None
    return str(wait_for(find, what=f"session_start of pid {pid}"))


def argvs(events: list[dict[str, Any]], kind: str = "exec") -> Counter[tuple[str, ...]]:
    return Counter(tuple(e["process"]["argv"]) for e in events if e["kind"] == kind)


def test_agent_session_end_to_end(daemon: Daemon, fake_agent: Path, test_user: pwd.struct_passwd) -> None:
    # tail started before the agent, reading JSON lines in the background
    tail = subprocess.Popen([sys.executable, "-m", "agentwarden.cli.main", "tail", "--json", "--agent", "fake",
                             "--config", str(daemon.config)], stdout=subprocess.PIPE, text=True)
    tailed: list[dict[str, Any]] = []
    threading.Thread(target=lambda: [tailed.append(json.loads(line)) for line in tail.stdout or []],
                     daemon=True).start()
    wait_for(lambda: daemon.request("status")["tail_subscribers"] > 0, what="tail subscribed")

    # the same commands, at the same time, outside any agent
    stop_outside = threading.Event()

    def outside() -> None:
        while not stop_outside.is_set():
            subprocess.run(["/bin/sh", "-c", "/bin/echo outside-marker; ls / > /dev/null"],
                           stdout=subprocess.DEVNULL)
    t = threading.Thread(target=outside)
    t.start()
    try:
        agent = run_agent(fake_agent, SCRIPT.format(user=test_user.pw_name), login_uid=test_user.pw_uid)
        out, err = agent.communicate(timeout=60)
    finally:
        stop_outside.set()
        t.join()
    assert agent.returncode == 3, err
    sid = session_of(daemon, agent.pid)

    events = wait_for(lambda: (lambda evs: evs if any(e["kind"] == "session_end" for e in evs) else None)(
        daemon.events(session=sid)), what="session_end in the store")
    execs = [e for e in events if e["kind"] == "exec"]
    ok = [e for e in execs if e["exec"]["errno"] is None]
    by_argv = argvs(ok)

    # every command once, with its argv
    for argv in [("/bin/echo", "plain-marker"), ("ls", "/"), ("grep", "-c", "usr"),
                 ("setsid", "sh", "-c", "sleep 0.3; /bin/true bg-done"), ("sh", "-c", "sleep 0.3; /bin/true bg-done"),
                 ("sleep", "0.3"), ("/bin/true", "bg-done"), ("su", "-s", "/bin/sh", test_user.pw_name, "-c",
                 "/usr/bin/id -u"), ("/usr/bin/id", "-u"), ("sh", "-c", "exit 7"), ("sleep", "0.6")]:
        assert by_argv[argv] == (2 if argv == ("/usr/bin/id", "-u") else 1), (argv, by_argv)
    # setpriv execs id in place: one exec of setpriv, then id in the same pid
    assert by_argv[("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/id", "-u")] == 1

    # the failed exec appears once, with its errno; $PATH probing by execvp() does not
    failed = [e for e in execs if e["exec"]["errno"] is not None]
    assert argvs(failed) == Counter({("/nonexistent/aw-missing-cmd",): 1}), failed
    assert failed[0]["exec"]["errno"] == 2

    # parents: direct children of the agent have it as ppid
    root = agent.pid
    for argv in [("/bin/echo", "plain-marker"), ("ls", "/"), ("sh", "-c", "exit 7")]:
        (e,) = [e for e in ok if tuple(e["process"]["argv"]) == argv]
        assert e["process"]["ppid"] == root, e
    sleeper = next(e for e in ok if tuple(e["process"]["argv"]) == ("sleep", "0.3"))
    bg_sh = next(e for e in ok if tuple(e["process"]["argv"]) == ("sh", "-c", "sleep 0.3; /bin/true bg-done"))
    assert sleeper["process"]["ppid"] == bg_sh["process"]["pid"]

    # identity is the launcher's on every event, also after su/setpriv; process.uid is the real one
    for e in events:
        assert e["identity"]["uid"] == 0 and e["identity"]["user"] == "root", e
        assert e["identity"]["login_uid"] == test_user.pw_uid, e
        assert e["identity"]["login_user"] == test_user.pw_name, e
        assert e["agent"] == "fake"
    ids = [e for e in ok if tuple(e["process"]["argv"]) == ("/usr/bin/id", "-u")]
    assert sorted(e["process"]["uid"] for e in ids) == sorted([test_user.pw_uid, 65534])

    # exits carry codes and signals
    exits = {tuple(e["process"]["argv"]): e["exec"] for e in events if e["kind"] == "exit"}
    assert exits[("sh", "-c", "exit 7")]["exit_code"] == 7
    assert exits[("sh", "-c", "kill -9 $$")]["signal"] == 9
    end = next(e for e in events if e["kind"] == "session_end")
    assert end["exec"]["exit_code"] == 3
    assert end["ts"] >= max(e["ts"] for e in events if e["kind"] != "session_end")

    # nothing from outside the agent, anywhere
    assert not daemon.events(grep="outside-marker")
    assert all(e["session_id"] == sid for e in events)

    # the CLI finds them, and tail printed them live
    res = daemon.cli("query", "--json", "--session", sid, "--kind", "exec", "--limit", "1000")
    assert res.returncode == 0, res.stderr
    cli_events = [json.loads(line) for line in res.stdout.splitlines()]
    assert argvs(cli_events) == argvs(execs)
    wait_for(lambda: any(e["kind"] == "session_end" and e["session_id"] == sid for e in tailed),
             what="session_end on tail")
    tail.terminate()
    mine = [e for e in tailed if e["session_id"] == sid]
    assert argvs(mine) == argvs(execs)
    assert {e["event_id"] for e in mine} == {e["event_id"] for e in events}


def test_grep_and_human_output(daemon: Daemon, fake_agent: Path) -> None:
    agent = run_agent(fake_agent, "/bin/echo grep-me-please; /bin/true")
    agent.communicate(timeout=30)
    sid = session_of(daemon, agent.pid)
    found = wait_for(lambda: daemon.events(session=sid, grep="GREP-ME", kinds=["exec"]), what="grep hit")
    assert [e["process"]["argv"] for e in found] == [["/bin/echo", "grep-me-please"]] * len(found)
    res = daemon.cli("query", "--session", sid, "--kind", "exec")
    assert res.returncode == 0 and "/bin/echo grep-me-please" in res.stdout
    res = daemon.cli("sessions")
    assert res.returncode == 0 and sid in res.stdout
    res = daemon.cli("sessions", "--json")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    row = next(r for r in rows if r["session_id"] == sid)
    assert row["agent"] == "fake" and row["root_pid"] == agent.pid and row["events"] >= 4


def test_long_argv_is_truncated_and_flagged(daemon: Daemon, fake_agent: Path) -> None:
    many = " ".join(f"a{i}" for i in range(300))
    agent = run_agent(fake_agent, f"/bin/true {many}")
    agent.communicate(timeout=30)
    sid = session_of(daemon, agent.pid)
    (ev,) = wait_for(lambda: daemon.events(session=sid, kinds=["exec"]), what="exec")
    assert ev["exec"]["argv_truncated"] is True
    assert ev["process"]["argv"][:3] == ["/bin/true", "a0", "a1"]
    assert 1 < len(ev["process"]["argv"]) <= 128


def test_agent_running_before_the_daemon_is_seeded(tmp_path: Path, fake_agent: Path) -> None:
    agent_path = fake_agent.with_name("aw-seed-agent")
    agent_path.write_bytes(fake_agent.read_bytes())
    agent_path.chmod(0o755)
    agent = subprocess.Popen([str(agent_path), "-c", "sleep 1000 & read x; /bin/echo after-seed; exit 0"],
                             stdin=subprocess.PIPE, text=True)
    d = Daemon(tmp_path, [{"name": "seeded", "match": {"comm": ["aw-seed-agent"]}}])
    try:
        d.start()
        start = wait_for(lambda: d.events(kinds=["session_start"]), what="seeded session")
        assert start[0]["process"]["pid"] == agent.pid
        sid = start[0]["session_id"]
        agent.communicate("go\n", timeout=30)
        evs = wait_for(lambda: [e for e in d.events(session=sid, kinds=["exec"])
                                if e["process"]["argv"] == ["/bin/echo", "after-seed"]], what="exec after seed")
        assert evs[0]["process"]["ppid"] == agent.pid
    finally:
        subprocess.run(["pkill", "-f", "sleep 1000"])
        agent.kill()
        d.stop()
    time.sleep(0)


JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"
SECRETS = ("hunter2pw", "s3cr3t-e2e", "tk-e2e-123", JWT)


def test_secrets_are_masked_in_store_tail_and_log(daemon: Daemon, fake_agent: Path) -> None:
    tail = subprocess.Popen([sys.executable, "-m", "agentwarden.cli.main", "tail", "--json", "--agent", "fake",
                             "--config", str(daemon.config)], stdout=subprocess.PIPE, text=True)
    tailed: list[str] = []
    threading.Thread(target=lambda: [tailed.append(line) for line in tail.stdout or []], daemon=True).start()
    wait_for(lambda: daemon.request("status")["tail_subscribers"] > 0, what="tail subscribed")
    script = (f"/bin/true postgres://app:{SECRETS[0]}@db/x; env PGPASSWORD={SECRETS[1]} /bin/true; "
              f"/bin/echo --token {SECRETS[2]} > /dev/null; /bin/true 'https://h/cb?jwt={SECRETS[3]}'")
    agent = run_agent(fake_agent, script)
    agent.communicate(timeout=30)
    sid = session_of(daemon, agent.pid)
    events = wait_for(lambda: (lambda evs: evs if len(evs) >= 4 else None)(
        daemon.events(session=sid, kinds=["exec"])), what="execs")
    stored = json.dumps(events)
    wait_for(lambda: sum(1 for line in tailed if sid in line and '"exec"' in line) >= 4, what="execs on tail")
    tail.terminate()
    for secret in SECRETS:
        assert secret not in stored
        assert not any(secret in line for line in tailed)
    assert secret not in daemon.log.read_text()
    argvs = {e["process"]["argv"][0]: e["process"]["argv"] for e in events}
    assert argvs["env"][1].startswith("PGPASSWORD=[MASKED:password:")
    assert argvs["/bin/echo"][2].startswith("[MASKED:password:")
    # the same secret in another command gives the same marker
    agent = run_agent(fake_agent, f"/bin/true --password {SECRETS[2]}")
    agent.communicate(timeout=30)
    sid2 = session_of(daemon, agent.pid)
    (again,) = wait_for(lambda: daemon.events(session=sid2, kinds=["exec"]), what="second exec")
    assert again["process"]["argv"][2] == argvs["/bin/echo"][2]


def test_working_directory_at_exec(daemon: Daemon, fake_agent: Path, tmp_path: Path) -> None:
    """Read by the kernel at exec (no chdir syscall is traced): a name with a space, a path
    through a bind mount, and one deeper than the kernel walks (userspace reads /proc)."""
    spaced = tmp_path / "a dir"
    deep = tmp_path.joinpath(*[f"d{i}" for i in range(20)])
    mounted = tmp_path / "mnt"
    for d in (spaced, deep, mounted, tmp_path / "src" / "inner"):
        d.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(mounted)], check=True)
    try:
        agent = run_agent(fake_agent, f"cd '{spaced}' && /bin/true cwd-spaced; cd {mounted}/inner && "
                                      f"/bin/true cwd-mounted; cd {deep} && /bin/sleep 0.5 cwd-deep")
        agent.communicate(timeout=30)
    finally:
        subprocess.run(["umount", str(mounted)], check=False)
    sid = session_of(daemon, agent.pid)

    def cwds() -> dict[str, str] | None:
        got = {e["process"]["argv"][-1]: e["process"]["cwd"] for e in daemon.events(session=sid, kinds=["exec"])}
        return got if len(got) >= 3 else None
    got = wait_for(cwds, what="three execs")
    assert len(daemon.events(session=sid, kinds=["session_start"])) == 1
    assert got["cwd-spaced"] == str(spaced)
    assert got["cwd-mounted"] == str(mounted / "inner")
    assert got["cwd-deep"] == str(deep)
