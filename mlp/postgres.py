"""A throwaway PostgreSQL server on loopback, for the tests and the load test (scripts/load_test.py) that run
workers against a real one: started in a temporary folder, with an empty database, stopped and removed after."""

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Unavailable(Exception):
    """PostgreSQL, its driver or a user to run it as is missing; the message says how to get it."""


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's /usr/lib/postgresql/<version>/bin, or PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    on_path = shutil.which("initdb")
    candidates += [Path(on_path).parent] if on_path else []
    return next((c for c in candidates if (c / "pg_ctl").is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def throwaway_postgres(password: str = "", max_connections: int = 100) -> Iterator[str]:
    """A server on 127.0.0.1 with an empty database `tune`; its SQLAlchemy URL, with `password` in it if given
    (the server trusts loopback, so any password logs in: it is there to be masked, see mlp.study.shown)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise Unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    try:
        import psycopg
    except ImportError:
        raise Unavailable("the PostgreSQL driver is missing: pip install 'psycopg[binary]'") from None
    # PostgreSQL refuses to run as root, so root runs it as the postgres user, in a folder that user owns.
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="tune-postgres-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise Unavailable("running as root needs runuser to start PostgreSQL as another user")
        try:
            shutil.chown(root, user="postgres")
        except LookupError:
            raise Unavailable("running as root needs a 'postgres' user to start PostgreSQL as") from None
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"

    def pg(program: str, *args: str) -> None:
        subprocess.run([*as_user, str(bin_dir / program), *args], check=True, capture_output=True, timeout=120)

    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        for attempt in range(3):  # another process (a test beside this one) may take the free port before the server
            port, logged = free_port(), log.stat().st_size if log.exists() else 0
            try:
                # -F: no fsync, -k: the socket in our folder rather than /var/run/postgresql.
                pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60",
                   "-o", f"-h 127.0.0.1 -p {port} -k {root} -F -N {max_connections}", "start")
                break
            except subprocess.CalledProcessError:
                if attempt == 2 or b"could not bind" not in log.read_bytes()[logged:]:  # this attempt's lines
                    raise
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE tune")
        login = f"postgres:{password}" if password else "postgres"
        yield f"postgresql+psycopg://{login}@127.0.0.1:{port}/tune"
    finally:
        if (data / "postmaster.pid").exists():
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root)
