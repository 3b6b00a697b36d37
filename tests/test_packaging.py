"""What `pip install` of the project installs is every module and BPF source of the tree: the
packages are listed by hand in pyproject.toml (the folders map onto agentwarden.<folder>), and a
subpackage left out of that list imports in a checkout and crashes an installed daemon."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("probes", "core", "daemon", "enforce", "cli")


def test_the_wheel_holds_every_module_and_probe_source(tmp_path: Path) -> None:
    # from a copy: setuptools reuses a checkout's build/ directory, which may hold what a
    # previous build listed
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             ".*_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("agentwarden-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("agentwarden/")}
    wanted = {"agentwarden/" + str(p.relative_to(REPO)) for top in FOLDERS for pattern in ("*.py", "*.bpf.c")
              for p in (REPO / top).rglob(pattern) if "__pycache__" not in p.parts}
    assert len(wanted) > 60
    assert sorted(wanted - shipped) == []
