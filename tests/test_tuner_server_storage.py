"""Studies on a PostgreSQL server (a throwaway one: `postgres_server` in tests/conftest.py)."""

from __future__ import annotations

import socket
import sys

import optuna
import pytest

pytestmark = pytest.mark.slow

GRID = [0, 1, 3, 4]  # crops.local_crops: four grid points, none of them the baseline's 2


def _load(url: str, name: str) -> optuna.Study:
    from tuner.study import storage_for

    return optuna.load_study(study_name=name, storage=storage_for(url))


def _tables(url: str) -> list[str]:
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        return [row[0] for row in cur.fetchall()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["refused", "password", "driver"])
def test_a_database_that_cannot_be_used_is_one_line_and_changes_nothing(case, tiny_space, tmp_path, monkeypatch,
                                                                          capsys, request):
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "bad")
    if case == "refused":  # a port with nothing listening
        url, expected = f"postgresql://tuner:secret@127.0.0.1:{_free_port()}/tuner", "Connection refused"
    else:
        good = request.getfixturevalue("postgres_url")
        if case == "password":
            url, expected = good.replace(":tuner-test-pw@", ":wrong@"), 'password authentication failed for user "tuner"'
        else:  # the driver package missing, as on a machine without it
            from sqlalchemy.engine import make_url

            driver = make_url(good).get_dialect().driver  # psycopg with SQLAlchemy 2.1, psycopg2 with 2.0
            monkeypatch.setitem(sys.modules, driver, None)
            url, expected = good, f"its database driver {driver} is not installed; pip install"
    for argv in (["run", str(path), "--storage", url, "--confirm-rounds", "0"], ["status", url]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: postgresql://tuner:***@127.0.0.1:") and expected in err[0]
        assert "secret" not in err[0] and "tuner-test-pw" not in err[0]
    if case == "driver":
        monkeypatch.delitem(sys.modules, driver)
    if case != "refused":
        assert _tables(good) == []  # no study, not even Optuna's tables
    assert not (tmp_path / "studies").exists()
