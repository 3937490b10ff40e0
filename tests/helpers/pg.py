"""A real PostgreSQL server for the tests: each test (or module) gets a database of its own, made with
``CREATE DATABASE`` and dropped afterwards. The server is the one ``FLAGMATCH_TEST_POSTGRES`` names (an
SQLAlchemy URL of a database the tests may create others from; ``.ci/run`` starts Debian's cluster and
sets it, e.g. ``postgresql+psycopg://root@/postgres?host=/var/run/postgresql``); without it, a throwaway
cluster the tests start themselves with the server binaries on this machine (Debian's ``postgresql``
package: ``initdb`` and ``pg_ctl``), listening on a Unix socket in a temp folder only, stopped and removed
when the tests end. Where there is neither, the PostgreSQL variants are skipped with the reason — never
passed silently."""
from __future__ import annotations

import atexit
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import uuid
from functools import lru_cache

import pytest

ENV = "FLAGMATCH_TEST_POSTGRES"
_names = itertools.count()
_created: list[str] = []


def _binaries() -> str | None:
    """The folder of initdb and pg_ctl: Debian's newest, else whatever PATH has."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: [int(x) if x.isdigit() else 0
                                                                                  for x in p.split("/")[4].split(".")])
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _throwaway() -> tuple[str, str]:
    """Start a cluster of our own on a Unix socket in a temp folder; (its URL, "") or ("", why not).
    PostgreSQL refuses to run as root: as root, the cluster runs as the ``postgres`` user."""
    bindir = _binaries()
    if bindir is None:
        return "", (f"PostgreSQL tests need a server: set {ENV} to an SQLAlchemy URL, or install the server "
                    f"binaries (apt-get install postgresql) for a throwaway cluster")
    root = tempfile.mkdtemp(prefix="flagmatch-pg-")
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.mkdir(sock)
    run_as: list[str] = []
    user = None
    if os.geteuid() == 0:
        import pwd
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            return "", "running as root, a throwaway PostgreSQL cluster needs the 'postgres' user"
        for path in (root, sock):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        run_as, user = ["runuser", "-u", "postgres", "--"], "postgres"
    log = os.path.join(root, "server.log")
    try:
        subprocess.run([*run_as, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", user or _me(), "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
                        f"-c listen_addresses='' -c unix_socket_directories={sock} -c fsync=off "
                        f"-c max_connections=200", "start"], check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        return "", f"a throwaway PostgreSQL cluster did not start: {exc} {detail.decode(errors='replace')[-300:]}"

    def stop() -> None:
        subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)
    atexit.register(stop)
    return f"postgresql+psycopg://{user or _me()}@/postgres?host={sock}", ""


def _me() -> str:
    import getpass
    return getpass.getuser()


@lru_cache(maxsize=1)
def _admin() -> tuple[object | None, str]:
    """(engine, "") when the server answers, else (None, why)."""
    url = os.environ.get(ENV, "")
    if not url:
        url, why = _throwaway()
        if not url:
            return None, why
        os.environ[ENV] = url  # subprocesses and later lookups use the same cluster
    try:
        from sqlalchemy import create_engine, text
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1)
                               if url.startswith("postgresql://") else url, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text("select 1"))
        return engine, ""
    except Exception as exc:  # driver missing, server down, no role: say which
        return None, f"PostgreSQL at {ENV}={url} does not answer: {type(exc).__name__}: {str(exc).splitlines()[0]}"


def require() -> object:
    engine, why = _admin()
    if engine is None:
        pytest.skip(why)
    return engine


def create_database(template: str | None = None) -> str:
    """A new empty database (or a copy of ``template``'s database URL) and its URL."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    engine = require()
    name = f"fm_test_{os.getpid()}_{next(_names)}_{uuid.uuid4().hex[:6]}"
    with engine.connect() as c:  # type: ignore[attr-defined]
        if template:
            _copy(c, make_url(template).database, name)
        else:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    _created.append(name)
    return make_url(engine.url).set(database=name).render_as_string(hide_password=False)  # type: ignore[attr-defined]


# the refusals a server process of the database's own (an autovacuum worker) causes while it runs
_BUSY = ("pg_signal_backend", "must be a superuser", "being accessed by other users")


def _copy(c: object, src: str, name: str) -> None:
    """``CREATE DATABASE name TEMPLATE src``. A template may have no other session: the module's own
    store's sessions are ended (only this role's client sessions: a server process such as an
    autovacuum worker may be signalled by a superuser alone), and a copy refused while a server process
    still reads the template is retried while it finishes."""
    import time
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError
    for attempt in range(40):
        c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "  # type: ignore[attr-defined]
                       "WHERE datname = :d AND pid <> pg_backend_pid() "
                       "AND usename = current_user AND backend_type = 'client backend'"), {"d": src})
        try:
            c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{src}"'))  # type: ignore[attr-defined]
            return
        except DBAPIError as exc:
            if not any(m in str(exc) for m in _BUSY) or attempt == 39:
                raise
            time.sleep(0.25)


def drop_database(url: str) -> None:
    """Drop a test's database. ``WITH (FORCE)`` ends its sessions; one of the server's own (an autovacuum
    worker) may only be ended by a superuser (or, on some versions, ``pg_signal_backend``), so a refusal
    is retried a few times while that worker finishes."""
    import time
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError
    engine, _ = _admin()
    if engine is None:
        return
    for attempt in range(20):
        try:
            with engine.connect() as c:  # type: ignore[attr-defined]
                c.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
            return
        except DBAPIError as exc:
            if not any(m in str(exc) for m in _BUSY) or attempt == 19:
                raise
            time.sleep(0.5)


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def drop_all() -> None:
    """Drop every database this test process created (the end of the session)."""
    from sqlalchemy.engine import make_url
    engine, _ = _admin()
    if engine is None:
        return
    for name in _created:
        drop_database(make_url(engine.url).set(database=name).render_as_string(hide_password=False))  # type: ignore[attr-defined]
    _created.clear()
    engine.dispose()  # type: ignore[attr-defined]
