"""A daemon in a container reads the node through `host_root`: its users and groups, its
libssl and glibc (found in its own ldconfig cache, links followed inside it), its cgroup2
hierarchy, and the DSN from a Secret's file.  Exercised against a fake host root."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentwarden.core import identity
from agentwarden.daemon import tls_libs
from agentwarden.daemon.config import ConfigError, parse, resolve_dsn
from agentwarden.probes.loader import cgroup2_root
from conftest import need_root


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                        "nodeuser:x:4321:4400:A person:/home/nodeuser:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\nnodeusers:x:4400:\nsre:x:4500:other,nodeuser\n"
                                       "agentwarden:x:4600:\n")
    yield root
    identity.use_host_root("")


def test_users_and_groups_are_the_nodes(host: Path) -> None:
    assert identity.user_name(4321) != "nodeuser"     # this machine has no such user
    identity.use_host_root(str(host))
    assert identity.user_name(4321) == "nodeuser" and identity.user_name(0) == "root"
    assert identity.user_name(9999) == "9999"
    assert identity.user_groups("nodeuser") == frozenset({"nodeusers", "sre"})
    assert identity.group_gid("agentwarden") == 4600 and identity.group_gid("nope") is None
    # a changed file is read again (a user added on the node while the daemon runs)
    (host / "etc" / "passwd").write_text((host / "etc" / "passwd").read_text() + "late:x:4322:4400::/:/bin/sh\n")
    os.utime(host / "etc" / "passwd", (1, 1))
    assert identity.user_name(4322) == "late"
    identity.use_host_root("/")
    assert identity.user_name(0) == "root" and identity.group_gid("nope") is None


def test_the_nodes_libssl_is_found_through_its_own_cache_and_links(host: Path) -> None:
    need_root()    # ldconfig -r chroots
    real = next(iter(tls_libs.system_libssl()))
    libdir = host / "usr" / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    shutil.copy(real, libdir / "libssl.so.3")
    (host / "lib").symlink_to("usr/lib")                        # merged /usr, a relative link
    (host / "usr" / "lib" / "ssl-current").symlink_to("/usr/lib/x86_64-linux-gnu")   # absolute: the node's /
    (host / "etc" / "ld.so.conf").write_text("/usr/lib/ssl-current\n")
    subprocess.run(["ldconfig", "-r", str(host)], check=True, capture_output=True, timeout=60)
    found = tls_libs.system_libssl(str(host))
    assert found == {str(libdir / "libssl.so.3")}, found
    assert tls_libs.system_libssl() != found        # without host_root: this system's own


def test_the_cgroup_root_must_be_the_nodes_hierarchy(host: Path) -> None:
    need_root()
    cg = host / "sys" / "fs" / "cgroup"
    cg.mkdir(parents=True)
    with pytest.raises(OSError, match="not a cgroup2 mount"):
        cgroup2_root(str(cg))
    subprocess.run(["mount", "--bind", cgroup2_root(), str(cg)], check=True)
    try:
        assert cgroup2_root(str(cg)) == str(cg)
        assert os.stat(cg).st_ino == os.stat(cgroup2_root()).st_ino
    finally:
        subprocess.run(["umount", str(cg)], check=True)


def test_config_reads_the_host_root_the_secret_and_the_node_name(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("https://agentwarden:s3cret@clickhouse.example:8443/audit\n")
    monkeypatch.setenv("AGENTWARDEN_HOST", "node-7")
    cfg = parse(f"host_root: /host/\nstore: {{dsn_file: {secret}}}\n")
    assert cfg.host_root == "/host" and cfg.probes.cgroup_root == "/host/sys/fs/cgroup"
    assert "s3cret" not in cfg.store.dsn          # read by the daemon only (the CLI's users may not)
    cfg = resolve_dsn(cfg)
    assert cfg.store.dsn == "https://agentwarden:s3cret@clickhouse.example:8443/audit"
    assert cfg.store.database == "audit"
    assert cfg.host == "node-7"
    assert parse("host: named\n").host == "named"          # a configured name wins
    with pytest.raises(ConfigError, match="store.dsn_file: cannot read"):
        resolve_dsn(parse(f"store: {{dsn_file: {tmp_path / 'missing'}}}\n"))
    secret.write_text("not a dsn\n")
    with pytest.raises(ConfigError, match="store.dsn_file: .* holds no"):
        resolve_dsn(parse(f"store: {{dsn_file: {secret}}}\n"))
    with pytest.raises(ConfigError, match="host_root: expected an absolute path"):
        parse("host_root: host\n")


def test_the_dsn_file_holding_a_password_becomes_roots_alone(tmp_path: Path) -> None:
    need_root()
    from agentwarden.daemon import secure

    tmp_path.chmod(0o755)
    secret = tmp_path / "dsn"
    secret.write_text(f"chdb://{tmp_path / 'audit'}\n")
    secret.chmod(0o644)
    cfg = resolve_dsn(parse(f"store: {{dsn_file: {secret}, spool_dir: {tmp_path / 'spool'}}}\n"
                            f"mask: {{key_file: {tmp_path / 'mask.key'}}}\nenforce: {{policy_file: '', "
                            f"state_file: {tmp_path / 'ap.json'}}}\n"))
    secure.prepare(cfg)
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    os.chown(secret, 65534, 65534)      # a file someone else could rewrite: refused
    with pytest.raises(secure.InsecureSetup, match="store DSN file"):
        secure.prepare(cfg)


def test_the_identity_bindings_are_roots_alone(tmp_path: Path) -> None:
    """Whoever could write the bindings would verify their own sessions as anyone."""
    need_root()
    from agentwarden.daemon import secure

    tmp_path.chmod(0o755)
    state = tmp_path / "identity.json"
    state.write_text('{"bindings": []}')
    state.chmod(0o644)
    cfg = parse(f"store: {{dsn: 'chdb://{tmp_path / 'audit'}', spool_dir: {tmp_path / 'spool'}}}\n"
                f"mask: {{key_file: {tmp_path / 'mask.key'}}}\nenforce: {{policy_file: '', "
                f"state_file: {tmp_path / 'ap.json'}}}\nidentity: {{state_file: {state}}}\n")
    secure.prepare(cfg)
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    os.chown(state, 65534, 65534)
    with pytest.raises(secure.InsecureSetup, match="identity bindings"):
        secure.prepare(cfg)
