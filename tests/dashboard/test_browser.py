"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against a
real uvicorn server: what an operator sees, and that attacker-controlled text stays text.

Each page is saved as a screenshot (into docs/images/, shown by docs/dashboard.md, with
FASTPROF_UPDATE_SCREENSHOTS=1; see tests/dashboard/conftest.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider

import fastprof
from fastprof.dashboard import dashboard_token
from fastprof.profiling import mint_token
from tests._server import serve
from tests.dashboard._app import SECRET, XSS, create_app
from tests.dashboard.conftest import IMAGES

pytestmark = pytest.mark.server

MOUNT = "/_fastprof/dashboard"
JAEGER = "http://127.0.0.1:16686/trace/{trace_id}"


class Site:
    def __init__(self, url: str, dashboard: fastprof.Dashboard) -> None:
        self.url = url
        self.base = url + MOUNT
        self.dashboard = dashboard
        self.profile_ids: list[str] = []


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    provider = TracerProvider()
    profiling = fastprof.Profiling(secret=SECRET, max_per_minute=100)
    dashboard = fastprof.Dashboard(
        secret=SECRET, profiling=profiling, jaeger_url=JAEGER, slow_s=0.1
    )
    provider.add_span_processor(dashboard.span_processor)
    app = create_app(provider, profiling)
    dashboard.mount(app, MOUNT)
    with serve(app, lifespan="on") as url:
        site = Site(url, dashboard)
        with httpx.Client(base_url=url, timeout=10) as client:
            for item in (1, 2, 3):
                assert client.get(f"/items/{item}").status_code == 200
            for item in (41, 42):
                token = mint_token(SECRET, ttl_s=60)
                response = client.get(f"/items/{item}", headers={"X-Fastprof-Profile": token})
                site.profile_ids.append(response.headers["x-fastprof-profile-id"])
            assert client.get(f"/echo/{XSS}").status_code == 404
            assert client.get("/items/5", headers={"user-agent": XSS}).status_code == 200
            assert client.get("/blocking").status_code == 200
            # Last: uvicorn closes the connection after an unhandled exception.
            assert client.get("/fail").status_code == 500
        profiling.flush()
        assert dashboard.flush()
        yield site
    dashboard.close()
    provider.shutdown()
    profiling.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(
        extra_http_headers={"authorization": f"Bearer {dashboard_token(SECRET)}"},
        viewport={"width": 1280, "height": 860},
    )
    page = context.new_page()
    yield page
    context.close()


def _fastapi_version() -> tuple[int, int]:
    import fastapi

    major, minor = fastapi.__version__.split(".")[:2]
    return int(major), int(minor)


def _shot(page: Any, name: str) -> None:
    os.makedirs(IMAGES, exist_ok=True)
    page.screenshot(path=os.path.join(IMAGES, name), full_page=False)


def _rows(page: Any) -> list[str]:
    """The listed requests as tab-separated cells (the browser's own favicon requests
    to the app are recorded too; they are left out)."""
    rows = [row.inner_text() for row in page.locator("#requests tr.req").all()]
    return [row for row in rows if "/favicon.ico" not in row]


def test_the_test_requests_are_listed_with_their_flags(site: Site, page: Any) -> None:
    response = page.goto(site.base + "/")
    assert response.status == 200
    rows = _rows(page)
    assert len(rows) == 9  # every request of the fixture, none of the dashboard's own
    texts = "\n".join(rows)
    for path in ("/items/1", "/items/2", "/items/3", "/items/41", "/fail", "/blocking"):
        assert path in texts
    by_path = {row.split("\t")[3]: row for row in rows}
    assert "loop blocked" in by_path["/blocking"] and "slow" in by_path["/blocking"]
    assert "error" in by_path["/fail"] and "500" in by_path["/fail"]
    assert "profiled" in by_path["/items/41"] and "profiled" in by_path["/items/42"]
    assert "profiled" not in by_path["/items/1"]
    _shot(page, "dashboard-requests.png")


def test_filters_by_route_duration_status_and_flag(site: Site, page: Any) -> None:
    page.goto(site.base + "/")
    page.select_option("select[name=route]", "/items/{item_id}")
    page.click("button[type=submit]")
    assert {row.split("\t")[2] for row in _rows(page)} == {"/items/{item_id}"}
    assert len(_rows(page)) == 6
    page.goto(site.base + "/?status=5")
    assert [row.split("\t")[3] for row in _rows(page)] == ["/fail"]
    page.goto(site.base + "/?min_ms=100")
    assert [row.split("\t")[3] for row in _rows(page)] == ["/blocking"]
    page.goto(site.base + "/?profiled=1")
    assert sorted(row.split("\t")[3] for row in _rows(page)) == ["/items/41", "/items/42"]


def test_a_click_opens_the_waterfall_with_the_dependencies_in_order(
    site: Site, page: Any
) -> None:
    page.goto(site.base + "/")
    page.locator("#requests a.open", has_text="/items/1").first.click()
    page.wait_for_selector("#waterfall")
    names = [n.strip() for n in page.locator("#waterfall tr.span .span-name").all_inner_texts()]
    kinds = page.locator("#waterfall tr.span").evaluate_all(
        "rows => rows.map(r => r.dataset.kind)"
    )
    dependencies = [n for n, k in zip(names, kinds) if k in ("dependency", "teardown")]
    assert dependencies == [
        "dependency current_user",
        "dependency get_db",
        "dependency get_settings",
        "teardown get_db",
    ]
    assert kinds[0] == "root"
    text = page.inner_text("#waterfall")
    assert "waited" in text and "worker thread" in text  # get_settings' thread-pool wait
    # FastAPI >= 0.118 runs the teardown after the response (0.115-0.117: before it).
    assert ("(after the response)" in text) is (_fastapi_version() >= (0, 118))
    jaeger = page.get_attribute("#jaeger", "href")
    assert jaeger is not None and jaeger.startswith("http://127.0.0.1:16686/trace/")
    assert len(jaeger.rsplit("/", 1)[1]) == 32
    _shot(page, "dashboard-request.png")


def test_the_blocked_loop_event_shows_file_and_line(site: Site, page: Any) -> None:
    page.goto(site.base + "/?blocked=1")
    page.locator("#requests a.open", has_text="/blocking").click()
    event = page.locator("#waterfall tr.event.blocked").first.inner_text()
    assert "event loop blocked" in event
    assert "dashboard/_app.py:" in event and "blocking" in event
    _shot(page, "dashboard-blocked.png")


def test_the_profiled_request_opens_its_flame_graph(site: Site, page: Any) -> None:
    page.goto(site.base + "/?profiled=1")
    page.locator("#requests a.open", has_text="/items/42").click()
    href = page.get_attribute("#profile", "href")
    assert href is not None and href.endswith(site.profile_ids[1])
    page.click("#profile")
    # pyinstrument's renderer (its script ships in the wheel) draws the call tree;
    # the sync dependency ran in a worker thread, sampled into the request's profile.
    page.wait_for_selector("text=get_settings [worker thread]", timeout=10_000)
    assert page.url.endswith("/profiles/" + site.profile_ids[1])
    _shot(page, "dashboard-profile.png")


def test_the_route_page_shows_percentiles_dependencies_and_the_aggregate(
    site: Site, page: Any
) -> None:
    page.goto(site.base + "/")
    page.locator("#requests td a", has_text="/items/{item_id}").first.click()
    stats = page.locator("#route-stats tr").nth(1).inner_text().split("\t")
    assert stats[0] == "6"
    p50, p95, p99 = (float(v) for v in stats[1:])
    assert 0 < p50 <= p95 <= p99
    deps = {
        row.split("\t")[0]: row.split("\t")
        for row in page.locator("#dependencies tr").all_inner_texts()[1:]
    }
    assert set(deps) == {
        "dependency current_user",
        "dependency get_db",
        "dependency get_settings",
        "teardown get_db",
    }
    assert deps["dependency get_db"][2] == "6"  # calls
    assert float(deps["teardown get_db"][3]) >= 9.0  # p50 of a 10 ms teardown
    assert "2 sampled profile(s) combined" in page.inner_text("main")
    frame = page.frame_locator("#aggregate")
    frame.locator("text=get_settings [worker thread]").first.wait_for(timeout=10_000)
    _shot(page, "dashboard-route.png")
    # The slowest 5 % (of 6 requests: the slowest one) against the rest: 2 profiles in all.
    text = page.inner_text("main")
    counts = re.findall(r"(?:the slowest 5 %|the rest) \((\d+) profiles\)", text)
    assert sum(int(c) for c in counts) == 2, text
    page.locator("#part-rest, #part-slow").first.click()
    page.wait_for_selector("text=get_settings [worker thread]", timeout=10_000)
    assert "Samples" in page.inner_text("body")


def test_injected_script_in_path_header_and_exception_is_text(site: Site, page: Any) -> None:
    page.goto(site.base + "/")
    assert f"/echo/{XSS}" in page.inner_text("#requests")
    pages = [site.base + "/"]
    for link in page.locator("#requests a.open").all():
        href = link.get_attribute("href")
        assert href is not None
        pages.append(site.url + href)
    seen = ""
    for url in pages:
        page.goto(url)
        assert page.evaluate("window.__xss") is None
        assert page.locator("script").count() == 0
        seen += page.content()
        page.locator("details").evaluate_all("ds => ds.forEach(d => d.open = true)")
        seen += page.inner_text("body")
    assert seen.count(XSS) >= 3  # the path, the user-agent header, the exception message
    page.goto(site.base + "/?status=5")
    page.locator("#requests a.open", has_text="/fail").click()
    assert f"broken {XSS}" in page.inner_text(".exc-message")


def test_missing_or_wrong_credentials_are_refused_like_an_unknown_path(
    site: Site, browser: Any
) -> None:
    unknown = httpx.get(site.url + "/no-such-page")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"cookie": "fastprof_dashboard=1.x"}):
        context = browser.new_context(extra_http_headers=headers)
        page = context.new_page()
        for path in ("", "/", "/requests/0123456789abcdef", "/route?route=/fail", "/login"):
            response = page.goto(site.base + path)
            assert response.status == 404
            assert response.body() == unknown.content
            assert "location" not in response.headers
        context.close()


def test_a_login_link_signs_a_browser_in_with_a_cookie(site: Site, browser: Any) -> None:
    context = browser.new_context()
    page = context.new_page()
    response = page.goto(site.dashboard.login_url(site.base))
    assert response.status == 200 and page.url == site.base + "/"
    assert "/items/1" in "".join(_rows(page))
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == MOUNT
    context.close()
