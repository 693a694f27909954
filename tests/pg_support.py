"""A throwaway PostgreSQL cluster for the tests: initdb into a temporary directory, pg_ctl on a loopback port.

The server refuses to run as root, so when the tests run as root the cluster belongs to the unprivileged
``postgres`` user and every server command runs through ``runuser``. Nothing here skips: a cluster that
cannot start raises :class:`PostgresUnavailableError` with the command, its output and what to install, so the
suite fails and says why (the issue forbids skipping the database tests).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER_USER = "postgres"
DATABASE = "slipstream"


class PostgresUnavailableError(RuntimeError):
    """The test cluster could not be created or started; the message says why and what to run."""


def find_bin(name: str) -> str:
    """``initdb``/``pg_ctl``/... from PATH, else from Debian's ``/usr/lib/postgresql/<v>/bin``."""
    found = shutil.which(name)
    if found:
        return found
    for directory in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        candidate = directory / name
        if candidate.is_file():
            return str(candidate)
    raise PostgresUnavailableError(
        f"PostgreSQL's '{name}' is neither on PATH nor under /usr/lib/postgresql/*/bin. "
        "Run 'make postgres' (as root it installs Debian's 'postgresql' package)."
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """One cluster: :meth:`start` (initdb on first use), :meth:`stop`, :meth:`restart`, :meth:`destroy`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="slipstream-pg-")) if root is None else root
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.logfile = self.root / "server.log"
        self.port = free_port()
        self._as_other = os.geteuid() == 0
        self._initialized = False

    @property
    def dsn(self) -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *argv: str, timeout_s: float = 60.0) -> str:
        cmd = list(argv)
        if self._as_other:  # the server refuses root; runuser keeps the environment minimal and needs no tty
            cmd = ["runuser", "-u", SERVER_USER, "--", *cmd]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd="/", check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailableError(f"'{' '.join(cmd)}' could not run: {exc}") from exc
        if done.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise PostgresUnavailableError(
                f"'{' '.join(cmd)}' failed with exit code {done.returncode}:\n{done.stdout}{done.stderr}\n"
                f"server log tail:\n{log}"
            )
        return done.stdout

    def _init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._as_other:
            try:
                user = pwd.getpwnam(SERVER_USER)
            except KeyError as exc:
                raise PostgresUnavailableError(
                    f"The tests run as root and PostgreSQL refuses root, but there is no '{SERVER_USER}' user. "
                    "Install Debian's 'postgresql' package (it creates the user) or run the tests unprivileged."
                ) from exc
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.root.chmod(0o700)
        self._run(find_bin("initdb"), "-D", str(self.data), "-U", SERVER_USER, "-A", "trust", "--no-sync", "-E", "UTF8")
        self._initialized = True

    def start(self) -> None:
        if not self._initialized:
            self._init()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} -c fsync=off"
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-o", options, "-w", "start")
        if not getattr(self, "_created", False):
            self._run(
                find_bin("createdb"), "-h", str(self.socket_dir), "-p", str(self.port), "-U", SERVER_USER, DATABASE
            )
            self._created = True

    def stop(self, mode: str = "fast") -> None:
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server (fast: connections are cut), stay down ``down_s`` seconds, start it on the same port."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def running(self) -> bool:
        status = subprocess.run(
            [
                *(["runuser", "-u", SERVER_USER, "--"] if self._as_other else []),
                find_bin("pg_ctl"),
                "-D",
                str(self.data),
                "status",
            ],
            capture_output=True,
            cwd="/",
            check=False,
        )
        return status.returncode == 0

    def add_password_role(self, role: str, password: str) -> None:
        """A login role that must give its password over TCP (scram), while everything else stays trusted."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            conn.execute(f"GRANT ALL ON DATABASE {DATABASE} TO {role}")
        hba = self.data / "pg_hba.conf"
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "reload")
        time.sleep(0.2)  # the postmaster rereads pg_hba.conf on SIGHUP, asynchronously

    def destroy(self) -> None:
        try:
            if self._initialized and self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
