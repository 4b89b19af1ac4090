"""One SQLite file per host: every worker process's requests on any worker's page."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import httpx
import pytest

import fastprof
from fastprof.dashboard import RequestFilter, SQLiteStore, dashboard_token
from tests.dashboard._app import SECRET
from tests.dashboard.test_bounds import _drive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.anyio
async def test_a_page_shows_the_requests_of_another_worker_process(tmp_path) -> None:
    path = str(tmp_path / "host.sqlite3")
    other = textwrap.dedent(
        f"""
        import fastprof
        from fastprof.dashboard import SQLiteStore
        from tests.dashboard.test_bounds import _drive
        dashboard = fastprof.Dashboard(secret={SECRET!r}, store=SQLiteStore({path!r}))
        _drive(dashboard.span_processor, 30)
        dashboard.close()
        """
    )
    subprocess.run([sys.executable, "-c", other], cwd=ROOT, check=True, timeout=60)
    store = SQLiteStore(path)
    dashboard = fastprof.Dashboard(secret=SECRET, store=store)
    _drive(dashboard.span_processor, 5, first=1000)  # this process's own
    pids = {r.pid for r in store.recent(RequestFilter(limit=100))}
    assert len(store) == 35 and len(pids) == 2 and os.getpid() in pids
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=dashboard.app()), base_url="http://testserver"
    ) as client:
        page = await client.get("/", headers={"authorization": f"Bearer {dashboard_token(SECRET)}"})
    assert page.status_code == 200
    assert page.text.count("<tr class='req'") == 35
    dashboard.close()


def test_a_request_stored_again_is_counted_once(tmp_path) -> None:
    store = SQLiteStore(str(tmp_path / "host.sqlite3"))
    dashboard = fastprof.Dashboard(secret=SECRET, store=store)
    _drive(dashboard.span_processor, 10)
    _drive(dashboard.span_processor, 10)  # the same span ids: replaced, not added
    count, size = store.totals()["requests"]
    assert count == len(store.recent(RequestFilter(limit=100))) == 10
    (row,) = store._connect().execute("SELECT sum(size) FROM requests").fetchall()
    assert size == row[0]
    dashboard.close()
