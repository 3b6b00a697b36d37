"""The installed distribution's version: one source (pyproject.toml), read from its metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("agentwarden")
except PackageNotFoundError:   # a bare checkout on sys.path, never installed
    VERSION = "0+unknown"
