"""Red team 31, against a per-session bound on attached OpenSSL files (16, since withdrawn): an
agent that filled the bound with stub copies, then talked HTTPS through its own copy of libssl,
had it unwatched, and an HTTP deny rule did not refuse the request.  Every file that exports
OpenSSL's names is attached (the cost bound is on reading them: tls_libs.MAX_DYNAMIC_TABLE)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FAKE_COMM, Daemon, make_agent, need_root
from test_e2e_http import HASHED_CLIENT, STUB_SSL, Handler, tls_server  # noqa: F401  (fixture)

POLICY = """version: 1
rules:
  - name: no-admin
    when: {kind: http, http: {path: ["/admin/*"]}}
    action: deny
"""


def test_stub_libraries_loaded_first_leave_no_libssl_copy_unwatched(
        tls_server: int, tmp_path: Path) -> None:  # noqa: F811
    need_root()
    tmp_path.chmod(0o755)
    (tmp_path / "stub.c").write_text(STUB_SSL)
    stub = tmp_path / "stub.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(stub), str(tmp_path / "stub.c")], check=True)
    stubs = []
    for i in range(16):
        stubs.append(tmp_path / f"libfiller{i}.so")
        shutil.copy2(stub, stubs[-1])
    (tmp_path / "fill.py").write_text(
        f"import ctypes, socket, time\nlibs = [ctypes.CDLL(p) for p in {[str(s) for s in stubs]!r}]\n"
        f"socket.create_connection(('127.0.0.1', {tls_server})).close()\ntime.sleep(2)\n")
    client = tmp_path / "client.py"
    client.write_text(HASHED_CLIENT.replace('req = b"GET /hashed-libssl HTTP/1.1',
                                            'req = b"GET /" + sys.argv[3].encode() + b" HTTP/1.1'))
    control_lib = tmp_path / "libssl-c0c0c0c0.so.3"
    attack_lib = tmp_path / "libssl-a7a7a7a7.so.3"
    shutil.copy2("/usr/lib/x86_64-linux-gnu/libssl.so.3", control_lib)
    shutil.copy2("/usr/lib/x86_64-linux-gnu/libssl.so.3", attack_lib)
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", [{"name": "rt31", "match": {"comm": [FAKE_COMM]}}], policy=POLICY)
    agent = make_agent(tmp_path / "bin", FAKE_COMM)
    try:
        d.start()
        # control: the same copy-of-libssl client, no stubs first: refused
        Handler.paths.clear()
        ok = subprocess.run([str(agent), "-c", f"{sys.executable} {client} {control_lib} {tls_server} admin/control"],
                            capture_output=True, text=True, timeout=60)
        assert "200" not in ok.stdout, ("control not refused", ok)
        # attack: 16 stub copies attached first (another process of the session), then the real copy
        bad = subprocess.run([str(agent), "-c", f"{sys.executable} {tmp_path}/fill.py && "
                              f"{sys.executable} {client} {attack_lib} {tls_server} admin/attack"],
                             capture_output=True, text=True, timeout=60)
        served = "/admin/attack" in Handler.paths
        https = [e for e in d.events(kinds=["http"]) if "admin/attack" in e["http"]["path"]]
        print("\nRT31 cap: client rc", bad.returncode, bad.stdout.strip(), "| server saw", Handler.paths,
              "| http events", len(https))
        assert not served and bad.returncode != 0, (
            f"BYPASS: GET /admin/attack over the agent's own libssl copy (loaded after 16 stubs) "
            f"was served under a deny rule; http events recorded for it: {len(https)}; client {bad!r}")
    finally:
        d.stop()
