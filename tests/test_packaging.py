"""What `pip install` of the project installs is every module and BPF source of the tree: the
packages are listed by hand in pyproject.toml (the folders map onto agentwarden.<folder>), and a
subpackage left out of that list imports in a checkout and crashes an installed daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import need_root
from pgserver import free_port

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("probes", "core", "daemon", "enforce", "cli")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # from a copy: setuptools reuses a checkout's build/ directory, which may hold what a
    # previous build listed
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             ".*_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("agentwarden-*.whl")
    return whl


def test_the_wheel_holds_every_module_and_probe_source(wheel: Path) -> None:
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("agentwarden/")}
    wanted = {"agentwarden/" + str(p.relative_to(REPO)) for top in FOLDERS for pattern in ("*.py", "*.bpf.c")
              for p in (REPO / top).rglob(pattern) if "__pycache__" not in p.parts}
    assert len(wanted) > 60
    assert sorted(wanted - shipped) == []


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel in a fresh virtualenv with the system's site packages (bcc comes from the
    distribution), as a user would install it.  Its dependencies are this environment's, made
    visible by a .pth line (a plain path line: the checkout's editable finder there is not
    loaded), and `pip check` says they satisfy the wheel's declared bounds."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    py = venv / "bin" / "python"
    site_dir = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    (site_dir / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300, cwd="/")
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120, cwd="/")
    # the system's own packages may have complaints of their own (pygobject without pycairo)
    ours = [line for line in check.stdout.splitlines() if line.startswith("agentwarden ")]
    assert not ours, ours
    return venv


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AGENTWARDEN_CONFIG")}


def test_the_installed_cli_runs_from_the_wheel_not_the_checkout(installed: Path) -> None:
    aw = str(installed / "bin" / "agentwarden")
    version = subprocess.run([aw, "--version"], capture_output=True, text=True, cwd="/", env=_clean_env())
    assert version.returncode == 0 and version.stdout.startswith("agentwarden, version 0."), version
    assert "Usage: agentwarden" in subprocess.run([aw, "-h"], capture_output=True, text=True, cwd="/").stdout
    where = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import agentwarden.daemon.l7.postgres as m, agentwarden.probes as p, os; "
                            "print(m.__file__); print(os.path.isfile(os.path.join(p.__path__[0], 'guard.bpf.c')))"],
                           capture_output=True, text=True, cwd="/", env=_clean_env(), check=True).stdout.split()
    assert where[0].startswith(str(installed)) and where[1] == "True", where


def test_the_installed_daemon_starts_and_answers(installed: Path, tmp_path: Path) -> None:
    """doctor, then a real daemon from the installed package: probes compiled from the shipped
    BPF sources, the embedded store, ready when its control socket answers."""
    need_root()
    aw = str(installed / "bin" / "agentwarden")
    sock = tmp_path / "aw.sock"
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({
        "builtin_agents": False, "agents": [{"name": "pkg", "match": {"comm": ["aw-pkg-agent"]}}],
        "store": {"dsn": f"chdb://{tmp_path / 'store'}", "spool_dir": str(tmp_path / "spool")},
        "control_socket": str(sock), "mask": {"key_file": str(tmp_path / "mask.key")},
        "enforce": {"policy_file": str(REPO / "deploy" / "policy.yaml"), "state_file": str(tmp_path / "ap.json")},
        "probes": {"pin_dir": f"/sys/fs/bpf/aw-pkg-{os.getpid()}"},
        "metrics": {"listen": f"127.0.0.1:{port}"},
        "chain": {"key_file": str(tmp_path / "chain.key"), "state_file": str(tmp_path / "chain.json"),
                  "anchor_file": str(tmp_path / "anchor.jsonl")},
        "identity": {"state_file": str(tmp_path / "identity.json")},
    }))
    cfg.chmod(0o600)
    doctor = subprocess.run([aw, "doctor", "--config", str(cfg)], capture_output=True, text=True, cwd="/",
                            env=_clean_env(), timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([aw, "daemon", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                cwd="/", env=_clean_env())
    try:
        deadline = time.monotonic() + 120
        while True:
            status = subprocess.run([aw, "status", "--config", str(cfg)], capture_output=True, text=True,
                                    cwd="/", env=_clean_env(), timeout=30)
            if status.returncode == 0:
                break
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert status.stdout.startswith("daemon     pid ") and "version 0." in status.stdout, status.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"agentwarden_pinned_links_and_maps" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        from agentwarden.probes.loader import remove_pins

        remove_pins(f"/sys/fs/bpf/aw-pkg-{os.getpid()}")
    assert proc.returncode == 0, log.read_text()
