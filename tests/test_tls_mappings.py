"""libssl copies an agent maps where the daemon might not look: two files under one name in
/proc/PID/maps, and a copy loaded after many stubs.

Red team 31, on the first version of the map_files reading, which kept a name's first executable
mapping: a decoy mapped at a low address from path P, then (in a mount namespace of the agent's
own) a libssl copy bind-mounted over P and dlopen'ed.  The decoy's range was taken for P, it
exports nothing, the copy got no uprobes, and an HTTP deny rule did not refuse its HTTPS.  The
mappings are now told apart by their files' inodes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FAKE_COMM, Daemon, make_agent, need_root
from test_e2e_http import NO_ADMIN_POLICY, PATH_CLIENT, STUB_SSL, Handler, tls_server  # noqa: F401  (fixture)

DECOY = """
import ctypes, os, subprocess, sys
P, real = sys.argv[1], sys.argv[4]
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
if sys.argv[5] == "decoy":
    fd = os.open(P, os.O_RDONLY)
    at = libc.mmap(0x10000000, 4096, 1 | 4, 2, fd, 0)      # PROT_READ|PROT_EXEC, MAP_PRIVATE: below every library
    assert at == 0x10000000, hex(at or 0)
    os.close(fd)
subprocess.run(["mount", "--bind", real, P], check=True)    # our own mount namespace (unshare -m)
"""


def test_a_decoy_mapped_first_under_the_libssl_copys_name_hides_the_copy(tls_server: int,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    need_root()
    tmp_path.chmod(0o755)
    real, real_control = tmp_path / "libssl-real.so.3", tmp_path / "libssl-control.so.3"
    shutil.copy2("/usr/lib/x86_64-linux-gnu/libssl.so.3", real)
    shutil.copy2("/usr/lib/x86_64-linux-gnu/libssl.so.3", real_control)   # a file of its own: attached by inode
    decoy = tmp_path / "libssl-9d9d9d9d.so.3"
    shutil.copy2("/usr/lib/x86_64-linux-gnu/libz.so.1" if Path("/usr/lib/x86_64-linux-gnu/libz.so.1").exists()
                 else "/bin/true", decoy)
    client = tmp_path / "client.py"
    client.write_text(DECOY + PATH_CLIENT)
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", [{"name": "rt31m", "match": {"comm": [FAKE_COMM]}}], policy=NO_ADMIN_POLICY)
    agent = make_agent(tmp_path / "bin", FAKE_COMM)
    try:
        d.start()
        Handler.paths.clear()
        # control: the same bind mount and client without the decoy mapping: refused
        ok = subprocess.run([str(agent), "-c", f"unshare -m --propagation private {sys.executable} {client} "
                             f"{decoy} {tls_server} admin/control {real_control} none"], capture_output=True, text=True,
                            timeout=60)
        assert "/admin/control" not in Handler.paths and "200" not in ok.stdout, ("control not refused", ok)
        bad = subprocess.run([str(agent), "-c", f"unshare -m --propagation private {sys.executable} {client} "
                              f"{decoy} {tls_server} admin/decoy {real} decoy"], capture_output=True, text=True, timeout=60)
        https = [e for e in d.events(kinds=["http"]) if "admin/decoy" in e["http"]["path"]]
        print("\nRT31 decoy: client rc", bad.returncode, bad.stdout.strip(), bad.stderr.strip()[-300:],
              "| server saw", Handler.paths, "| http events", len(https),
              "| attached:", [ln for ln in d.log.read_text().splitlines() if "OpenSSL uprobes attached" in ln][-3:])
        assert "/admin/decoy" not in Handler.paths and bad.returncode != 0, (
            f"BYPASS: GET /admin/decoy over a libssl copy that shares its maps name with a decoy mapped first "
            f"was served under a deny rule; http events recorded: {len(https)}; client {bad!r}")
    finally:
        d.stop()


def test_stub_libraries_loaded_first_leave_no_libssl_copy_unwatched(
        tls_server: int, tmp_path: Path) -> None:  # noqa: F811
    """Red team 31, against a per-session bound on attached OpenSSL files (16, since withdrawn): an
    agent that filled the bound with stub copies, then talked HTTPS through its own copy of libssl,
    had it unwatched, and an HTTP deny rule did not refuse the request.  Every file that exports
    OpenSSL's names is attached (the cost bound is on reading them: tls_libs.MAX_DYNAMIC_TABLE)."""
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
    client.write_text(PATH_CLIENT)
    control_lib = tmp_path / "libssl-c0c0c0c0.so.3"
    attack_lib = tmp_path / "libssl-a7a7a7a7.so.3"
    shutil.copy2("/usr/lib/x86_64-linux-gnu/libssl.so.3", control_lib)
    shutil.copy2("/usr/lib/x86_64-linux-gnu/libssl.so.3", attack_lib)
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d", [{"name": "rt31", "match": {"comm": [FAKE_COMM]}}], policy=NO_ADMIN_POLICY)
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
