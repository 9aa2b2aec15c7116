"""A throwaway PostgreSQL server for tests (shared by tests/db and tests/bench).

Uses the machine's ``initdb``/``pg_ctl`` (PATH, else /usr/lib/postgresql/*/bin). As root it
runs them as the ``postgres`` system user via ``runuser`` (initdb refuses root). When no
binaries exist it installs Debian's ``postgresql`` only if running as root and ``CI`` or
``ATELIER_INSTALL_PG`` is set; otherwise ``find_binaries`` explains why tests are skipped.
``ATELIER_TEST_PG_URL`` (an asyncpg URL of a superuser-ish role) uses an existing server.
The server trades durability for speed (fsync off): it only ever holds test data.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_USER = "atelier"


def _candidate_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists():
            return Path(d)
    return None


def find_binaries() -> tuple[Path | None, str]:
    """(bin dir, reason-if-missing)."""
    bindir = _candidate_bindir()
    if bindir is not None:
        return bindir, ""
    is_root = os.geteuid() == 0
    if is_root and (os.environ.get("CI") or os.environ.get("ATELIER_INSTALL_PG")):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True, timeout=600)
        done = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
            env=env,
            capture_output=True,
            timeout=900,
        )
        bindir = _candidate_bindir()
        if bindir is not None:
            return bindir, ""
        return None, f"apt-get install postgresql failed: {done.stderr.decode(errors='replace')[-300:]}"
    return None, (
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql or set "
        "ATELIER_INSTALL_PG=1 (as root) or ATELIER_TEST_PG_URL"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    bindir: Path
    datadir: Path
    port: int
    as_postgres: bool

    @property
    def admin_url(self) -> str:
        return f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def _cmd(self, *args: str) -> list[str]:
        return (["runuser", "-u", "postgres", "--"] if self.as_postgres else []) + list(args)

    def start(self) -> None:
        subprocess.run(
            self._cmd(str(self.bindir / "initdb"), "-D", str(self.datadir), "-A", "trust", "-U", PG_USER),
            check=True,
            capture_output=True,
            timeout=120,
        )
        opts = (
            f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        subprocess.run(
            self._cmd(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-o",
                opts,
                "-l",
                str(self.datadir / "server.log"),
                "-w",
                "start",
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def stop(self) -> None:
        subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop"),
            capture_output=True,
            timeout=60,
        )


def start_server() -> tuple[PgServer | None, str]:
    """Start a server in a fresh temp dir; (server, reason-if-none)."""
    bindir, reason = find_binaries()
    if bindir is None:
        return None, reason
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="atelier-pg-"))
    datadir = root / "data"
    datadir.mkdir()
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(datadir, "postgres", "postgres")
    server = PgServer(bindir, datadir, _free_port(), as_postgres)
    try:
        server.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        out = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(root, ignore_errors=True)
        return None, f"could not start PostgreSQL: {exc}: {out.decode(errors='replace')[-300:]}"
    return server, ""


def remove_server(server: PgServer) -> None:
    server.stop()
    shutil.rmtree(server.datadir.parent, ignore_errors=True)
