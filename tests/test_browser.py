"""End to end in a real browser: Playwright driving Debian's Chromium against `flagmatch serve`.
Screenshots of every page are kept in test-artifacts/screenshots/."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.conftest_web import TOKEN, build_clustered_home
from tests.helpers import drawn_image, encode, start_server, stop_server

CHROMIUM = os.environ.get("FLAGMATCH_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FLAGMATCH_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync", "--disable-quic"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_embedder):
    root = tmp_path_factory.mktemp("browser")
    s = build_clustered_home(root, tiny_model_dir, tiny_embedder)
    env = dict(FLAGMATCH_HOME=s.home, FLAGMATCH_MODEL=str(tiny_model_dir), FLAGMATCH_API_TOKENS=f"rita:{TOKEN}",
               FLAGMATCH_PRECISION="fp32")
    proc, base, log = start_server(env, root / "server.log")
    yield base, root
    stop_server(proc, log)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright
    shots = ARTIFACTS / "screenshots"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        problems: list[str] = []
        pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: problems.append(str(e)))
        pg.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        pg.problems = problems  # type: ignore[attr-defined]
        pg.shot = lambda name: pg.screenshot(path=str(shots / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]
        yield pg
        context.close()
        browser.close()


def test_moderator_journey(server, page):
    base, root = server
    page.goto(base + "/clusters")
    assert "/login" in page.url
    page.shot("01-login")
    page.fill("input[name=token]", TOKEN)
    page.click("form button:has-text('Sign in')")
    page.wait_for_url(base + "/clusters")
    cards = page.locator("article.card.cluster[data-cluster]")
    assert cards.count() == 4
    page.shot("02-clusters")

    # open a cluster, reveal one thumbnail
    cards.first.locator("h2 a").click()
    page.wait_for_url("**/clusters/*")
    cluster_url = page.url
    first = page.locator("figure.thumb").first
    src_before = first.locator("img").get_attribute("src")
    first.locator("button.reveal").click()
    # (a locator assertion: wait_for_function would eval a string, which the viewer's CSP forbids)
    expect(first.locator("img")).to_have_attribute("src", re.compile(r"clear=1"))
    assert "clear=1" not in src_before
    assert page.locator("figure.thumb").nth(1).locator("button.reveal").count() == 1  # only one revealed
    page.shot("03-cluster-revealed")

    # name the cluster
    page.fill("#decision-form input[name=name]", "Beach set")
    page.select_option("#decision-form select[name=label]", "adult_nudity")
    page.select_option("#decision-form select[name=reason_code]", "matches_policy")
    with page.expect_navigation():
        page.click("#decision-form button:has-text('Confirm')")
    assert "Beach set" in page.locator("h1").inner_text() and "confirmed" in page.locator("p.meta").inner_text()

    # unflag one member as a false positive
    page.locator("form.members input.pick").first.check()
    page.fill("form.members input[name=reason]", "not unsafe: a beach ball")
    with page.expect_navigation():
        page.click("button:has-text('Unflag selected')")
    assert "Unflagged 1 image(s)." in page.locator(".flash").inner_text()
    page.shot("04-cluster-after-unflag")

    # sweep the corpus for more like it, flag what we pick
    page.fill("input[name=min_similarity]", "-1")
    page.click("button:has-text('Sweep')")
    page.wait_for_url("**/sweep*")
    hits = page.locator(".sweep-hit")
    before = hits.count()
    assert before >= 2 and page.locator("#suggested").count() == 1 and page.locator("table.histogram").count() == 1
    page.shot("05-sweep")
    hits.first.locator("input.pick").check()
    with page.expect_navigation():
        page.click("button:has-text('Flag selected')")
    # back on the sweep, the other candidates still there
    assert "/sweep" in page.url and "Flagged 1 image(s)." in page.locator(".flash").inner_text()
    assert page.locator(".sweep-hit").count() == before - 1
    page.goto(cluster_url)

    # the map draws its points; a box selection opens them as a list
    page.goto(base + "/map")
    page.wait_for_selector("body[data-map-ready='1']", timeout=20_000)
    assert int(page.locator("#map").get_attribute("data-points")) == 60
    painted = page.evaluate("""() => { const c = document.getElementById('map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i+1] < 250 || d[i+2] < 250) n++; return n; }""")
    assert painted >= 60 * 2
    box = page.locator("#map").bounding_box()
    page.mouse.move(box["x"] + 3, box["y"] + 3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 3, box["y"] + box["height"] - 3, steps=8)
    page.mouse.up()
    assert int(page.locator("#map").get_attribute("data-selected")) == 60
    page.shot("06-map-selected")
    page.click("#selection-form button")
    page.wait_for_url("**/selection")
    assert page.locator(".card.image").count() == 60
    page.shot("07-selection")

    # search by uploading a file
    query = root / "query.jpg"
    query.write_bytes(encode(drawn_image(1001, (320, 240)), "JPEG"))
    page.goto(base + "/search")
    page.set_input_files("#search-file", str(query))
    with page.expect_navigation():
        page.click("#search-form button")
    assert page.locator(".card.image.hit").count() >= 5
    page.shot("08-search")

    # an image page
    page.locator(".card.image.hit a").first.click()
    page.wait_for_url("**/images/*")
    assert "Flag history" in page.content()
    page.shot("09-image")
    page.goto(base + "/audit")
    audit = page.locator("table.audit").inner_text()
    assert "reveal" in audit and "unflag" in audit and "flag" in audit and "cluster_confirmed" in audit
    page.shot("10-audit")
    assert not page.problems, page.problems
