"""A private MariaDB server for tests and benchmarks: Debian's `mariadbd` in a temp folder, on
its own unix socket and a free 127.0.0.1 port, with a real user and password (no
--skip-grant-tables), so the worker connects exactly as it would to a production server.

`MariaDB(dir).start()` initialises the data folder once (`mariadb-install-db`), starts the
server, waits until it answers, and creates the database and user. `stop()` is a clean
shutdown (SIGTERM, then SIGKILL past the bound); `restart()` keeps the data. Every wait is
bounded. Durability is the production default (innodb_flush_log_at_trx_commit=1) unless a
caller passes other options.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .support import PortInUse, free_port

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
ROOT_PASSWORD = "root-test-pw"


class MariaDB:
    def __init__(self, directory: Path, *, port: int | None = None, database: str = "iot", user: str = "iot",
                 password: str = "iot-test-pw", options: tuple[str, ...] = ()):
        if not os.path.exists(MARIADBD):
            raise RuntimeError("mariadbd is not installed: run ./install.sh --local --test-deps")
        self.dir = directory
        self.datadir = directory / "data"
        self.socket = directory / "mysqld.sock"
        self.port = port or free_port()
        self._may_move = port is None  # a port we picked may be changed if someone else took it
        self.database, self.user, self.password = database, user, password
        self.options = options
        self.log_path = directory / "mariadbd.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    # lifecycle -----------------------------------------------------------------------------------

    def _install(self, timeout: float) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            [INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
             "--user=root", "--skip-test-db", "--skip-name-resolve"],
            capture_output=True, timeout=timeout,
        )
        if r.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {r.stderr.decode(errors='replace')[-2000:]}")

    def start(self, timeout: float = 60.0) -> MariaDB:
        fresh = not (self.datadir / "mysql").is_dir()
        if fresh:
            self._install(timeout)
        for attempt in range(5):
            try:
                self._start(timeout)
                break
            except PortInUse:
                if not self._may_move or attempt == 4:
                    raise
                self.port = free_port()  # taken between free_port() and the bind: use another
        self._may_move = False  # from now on clients know this port: a restart keeps it
        if fresh:
            self._provision()
        return self

    def _start(self, timeout: float) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # the log is appended to
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--user=root", "--skip-name-resolve",
             f"--pid-file={self.dir / 'mariadbd.pid'}", "--innodb-buffer-pool-size=256M",
             "--innodb-log-file-size=48M", "--max-connections=50", "--skip-log-bin", *self.options],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self._wait_up(timeout)
        except RuntimeError:
            self._log.close()
            if b"Address already in use" in self.log_path.read_bytes()[offset:]:  # "Bind on TCP/IP port"
                raise PortInUse(f"mariadbd: port {self.port} is taken") from None
            raise

    def _wait_up(self, timeout: float) -> None:
        import pymysql  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                pymysql.connect(unix_socket=str(self.socket), user="root", password=self._root_password(),
                                connect_timeout=2).close()
                return
            except pymysql.MySQLError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mariadbd not answering after {timeout}s: {self.log()[-3000:]}") from None
                time.sleep(0.1)

    def _root_password(self) -> str:
        # Before provisioning root has no password (install-db with normal authentication).
        return ROOT_PASSWORD if (self.dir / ".provisioned").exists() else ""

    def _provision(self) -> None:
        with self.root() as c, c.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}` CHARACTER SET utf8mb4")
            for host in ("localhost", "127.0.0.1"):
                cur.execute(f"CREATE USER IF NOT EXISTS '{self.user}'@'{host}' IDENTIFIED BY %s", (self.password,))
                cur.execute(f"GRANT ALL ON `{self.database}`.* TO '{self.user}'@'{host}'")
            cur.execute("ALTER USER 'root'@'localhost' IDENTIFIED BY %s", (ROOT_PASSWORD,))
        (self.dir / ".provisioned").touch()

    def stop(self, timeout: float = 30.0) -> None:
        """Clean shutdown (what `systemctl stop mariadb` does)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self._log:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL: a crash. InnoDB recovers committed transactions on the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_for: float = 0.0, timeout: float = 60.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start(timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # access ---------------------------------------------------------------------------------------

    def root(self, database: str | None = None):
        import pymysql  # noqa: PLC0415

        return pymysql.connect(unix_socket=str(self.socket), user="root", password=self._root_password(),
                               database=database, autocommit=True, connect_timeout=5)

    def query(self, sql: str, args: tuple = (), database: str | None = None) -> list[tuple]:
        with self.root(database or self.database) as c, c.cursor() as cur:
            cur.execute(sql, args or None)  # no args: a literal '%' stays as it is
            return list(cur.fetchall())

    def create_database(self, name: str) -> None:
        """A fresh, empty database the test user may use (one per test keeps tests apart)."""
        with self.root() as c, c.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
            for host in ("localhost", "127.0.0.1"):
                cur.execute(f"GRANT ALL ON `{name}`.* TO '{self.user}'@'{host}'")

    def ingest_toml(self, database: str | None = None, *, tcp: bool = True) -> str:
        """The [ingest] keys that point iot-ingest at this server (add to an [ingest] section)."""
        where = (f'mysql_host = "127.0.0.1"\nmysql_port = {self.port}\n' if tcp
                 else f'mysql_socket = "{self.socket}"\n')
        return (f'backend = "mysql"\n{where}mysql_user = "{self.user}"\nmysql_password = "{self.password}"\n'
                f'mysql_database = "{database or self.database}"\nmysql_timeout = 5.0\n')
