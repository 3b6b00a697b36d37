"""A real PostgreSQL server for the tests: Debian's package, a throwaway cluster.

`log_statement = all` into a CSV log is the ground truth the captured
statements are compared with.
"""

from __future__ import annotations

import csv
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


def bin_dir() -> Path:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if not dirs:
        raise RuntimeError("PostgreSQL is not installed (deploy/setup.sh installs it)")
    return Path(dirs[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LoggedStatement:
    app: str
    kind: str      # statement (simple protocol) or execute (extended)
    name: str      # prepared statement name for execute
    text: str
    pid: int
    line: int


class PgServer:
    def __init__(self, ssl: bool = False) -> None:
        self.bin = bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="aw-pg-"))
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.port = free_port()
        pg = pwd.getpwnam("postgres")
        self.sockdir.mkdir()
        for p in (self.root, self.sockdir):
            os.chown(p, pg.pw_uid, pg.pw_gid)
            p.chmod(0o755)
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                           "--no-sync"])
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(f"""
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.sockdir}'
log_statement = 'all'
logging_collector = on
log_destination = 'csvlog'
log_directory = 'log'
log_filename = 'pg'
fsync = off
synchronous_commit = off
""")
            if ssl:
                f.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        if ssl:
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-subj", "/CN=127.0.0.1", "-keyout", str(self.data / "server.key"),
                            "-out", str(self.data / "server.crt")], check=True, capture_output=True)
            for name in ("server.key", "server.crt"):
                os.chown(self.data / name, pg.pw_uid, pg.pw_gid)
            (self.data / "server.key").chmod(0o600)

    def _as_postgres(self, cmd: list[str]) -> None:
        subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *cmd],
                       check=True, capture_output=True, cwd="/")

    def start(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                           str(self.root / "server.log"), "start"])
        self.psql("postgres", "create database awtest")

    def stop(self) -> None:
        subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                        str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, cwd="/")
        shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, db: str, sql: str) -> str:
        res = subprocess.run([str(self.bin / "psql"), "-X", "-h", str(self.sockdir), "-p", str(self.port),
                              "-U", "postgres", "-d", db, "-Atc", sql], capture_output=True, text=True,
                             check=True)
        return res.stdout

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=awtest"

    def logged(self) -> dict[str, list[LoggedStatement]]:
        """Statements the server logged, by application_name, in log order."""
        out: dict[str, list[LoggedStatement]] = defaultdict(list)
        path = self.data / "log" / "pg.csv"
        for _ in range(50):
            if path.exists():
                break
            time.sleep(0.1)
        with open(path, newline="") as f:
            for n, row in enumerate(csv.reader(f)):
                if len(row) < 23 or row[11] != "LOG":
                    continue
                message, app, pid = row[13], row[22], int(row[3] or 0)
                if message.startswith("statement: "):
                    out[app].append(LoggedStatement(app, "statement", "", message[len("statement: "):], pid, n))
                elif message.startswith("execute "):
                    head, _, text = message.partition(": ")
                    out[app].append(LoggedStatement(app, "execute", head[len("execute "):], text, pid, n))
        return out
