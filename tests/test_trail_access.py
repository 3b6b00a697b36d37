"""The person being audited cannot read the trail or its secrets, and cannot change what the
daemon trusts (daemon/secure.py).  Everything lies under a directory anyone may traverse, and
starts with the modes a careless install leaves (0644 files, 0755 directories)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentwarden.core.identity import group_gid
from conftest import Daemon, need_root

COMM = "aw-trail-agent"


@pytest.fixture
def host(test_user: Any) -> Iterator[Path]:
    need_root()
    base = Path(tempfile.mkdtemp(prefix="aw-trail-"))
    base.chmod(0o755)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


def as_user(user: Any, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                           "--", *cmd], capture_output=True, text=True, timeout=60)


def started(base: Path) -> Daemon:
    d = Daemon(base, [{"name": "t", "match": {"comm": [COMM]}}], policy="version: 1\nrules: []\n")
    key = Path(json.loads(d.config.read_text())["mask"]["key_file"])
    key.write_bytes(os.urandom(32))
    for f in (d.config, d.policy, key):
        f.chmod(0o644)
    for sub in (d.store_path, d.spool):
        sub.mkdir(mode=0o755)
        sub.chmod(0o755)
    return d


def test_the_audited_user_reads_neither_the_trail_nor_its_secrets(host: Path, test_user: Any) -> None:
    d = started(host)
    key = Path(json.loads(d.config.read_text())["mask"]["key_file"])
    # a control socket in a directory the daemon makes (its umask must not hide the public ops)
    cfg = json.loads(d.config.read_text())
    d.socket = host / "run" / "aw.sock"
    cfg["control_socket"] = str(d.socket)
    d.config.write_text(json.dumps(cfg))
    d.start()
    try:
        gid = group_gid("agentwarden") or 0
        for path, mode in ((d.config, 0o640), (key, 0o600), (d.store_path, 0o750), (d.spool, 0o750)):
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) == mode and st.st_uid == 0, (path, oct(st.st_mode))
            assert st.st_gid in (0, gid), path
        for cmd in (["cat", str(d.config)], ["cat", str(key)], ["ls", str(d.store_path)],
                    ["ls", str(d.spool)]):
            res = as_user(test_user, *cmd)
            assert res.returncode != 0 and "Permission denied" in res.stderr, (cmd, res)
        # the user's own copy of the config reaches the control socket, which refuses them
        mine = host / "mine.yaml"
        mine.write_text(json.dumps({"control_socket": str(d.socket),
                                    "store": {"dsn": f"chdb://{d.store_path}", "spool_dir": str(d.spool)}}))
        mine.chmod(0o644)
        cli = [sys.executable, "-m", "agentwarden.cli.main"]
        res = as_user(test_user, *cli, "query", "--config", str(mine))
        assert res.returncode == 1 and "neither root nor in group 'agentwarden'" in res.stderr, res
        assert stat.S_IMODE(d.socket.parent.stat().st_mode) == 0o755
        res = as_user(test_user, *cli, "pending", "--config", str(mine))   # a public operation
        assert res.returncode == 0, res
    finally:
        d.stop()
    # the daemon down, the CLI reads the store itself: not this user
    res = as_user(test_user, *cli, "query", "--config", str(mine))
    assert res.returncode == 1 and "readable by root and the agentwarden group only" in res.stderr, res
    assert "Traceback" not in res.stderr


def test_a_config_on_a_read_only_mount_is_taken_as_it_is(host: Path) -> None:
    """A Kubernetes ConfigMap volume: read-only, 0644 files in a 0777 directory.  Nobody can write
    it, so the daemon starts, and leaves it as it is."""
    volume, mount = host / "volume", host / "etc"
    volume.mkdir()
    mount.mkdir()
    d = started(host)
    cfg = json.loads(d.config.read_text())
    (volume / "config.yaml").write_text(json.dumps(cfg))
    (volume / "config.yaml").chmod(0o644)
    volume.chmod(0o777)
    subprocess.run(["mount", "--bind", str(volume), str(mount)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        d.config = mount / "config.yaml"
        d.start()
        d.stop()
        assert stat.S_IMODE(d.config.stat().st_mode) == 0o644
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("what", ["config writable by others", "key owned by the user",
                                  "policy writable by others", "config in a directory anyone can write",
                                  "store in a directory the user owns"])
def test_a_file_someone_else_can_change_stops_the_start(host: Path, test_user: Any, what: str) -> None:
    if what == "config in a directory anyone can write":
        inner = host / "open"
        inner.mkdir()
        inner.chmod(0o777)
        d = started(inner)
    else:
        d = started(host)
    key = Path(json.loads(d.config.read_text())["mask"]["key_file"])
    if what == "config writable by others":
        d.config.chmod(0o666)
    elif what == "key owned by the user":
        os.chown(key, test_user.pw_uid, test_user.pw_gid)
    elif what == "policy writable by others":
        d.policy.chmod(0o646)
    elif what == "store in a directory the user owns":
        theirs = host / "theirs"
        theirs.mkdir()
        os.chown(theirs, test_user.pw_uid, test_user.pw_gid)
        cfg = json.loads(d.config.read_text())
        cfg["store"]["dsn"] = f"chdb://{theirs}/store"
        d.config.write_text(json.dumps(cfg))
    res = subprocess.run([sys.executable, "-m", "agentwarden.cli.main", "daemon", "--config", str(d.config)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "refusing to start" in res.stderr, res
    assert "Traceback" not in res.stderr
    assert not d.socket.exists()
