"""End to end in a real browser: Playwright driving Debian's Chromium against `flagmatch serve`.
Screenshots of every page are kept in test-artifacts/screenshots/."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.helpers.web import TOKEN, build_clustered_home
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

    # name, label and confirm the cluster in one decision, in place: no page load
    navigations: list[str] = []
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
    page.fill("#decision-form input[name=name]", "Beach set")
    page.select_option("#decision-form select[name=label]", "adult_nudity")
    page.select_option("#decision-form select[name=reason_code]", "matches_policy")
    page.click("#decision-form button:has-text('Confirm')")
    expect(page.locator("#cluster-status")).to_have_text("confirmed")
    assert "Beach set" in page.locator("h1").inner_text() and navigations == []

    # unflag one member as a false positive, in place: the tile says so at once
    page.locator("form.members input.pick").first.check()
    page.fill("form.members input[name=reason]", "not unsafe: a beach ball")
    page.click("button:has-text('Unflag selected')")
    expect(page.locator(".flash")).to_contain_text("Unflagged 1 image(s).")
    expect(page.locator("form.members .card.image").first).to_have_class(re.compile("is-unflagged"))
    expect(page.locator("form.members .card.image").first.locator(".flagstate")).to_have_text("not flagged")
    assert navigations == []
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
    page.wait_for_selector("body[data-map-colours='1']", timeout=20_000)
    # colour by flag state, with a legend; the choice and the view are kept in the URL
    page.select_option("#colour-by", "flag")
    assert "c=flag" in page.url and page.locator("#legend li").count() == 3
    page.locator("#map").focus()
    before = page.url
    page.keyboard.press("+")  # keyboard zoom
    assert page.url != before and "v=" in page.url
    page.keyboard.press("0")
    page.reload()
    page.wait_for_selector("body[data-map-colours='1']", timeout=20_000)
    assert page.locator("#colour-by").input_value() == "flag"
    page.select_option("#colour-by", "cluster")
    assert page.locator("#legend li").count() == 5  # four clusters and "unclustered"
    # a plain drag pans (the points move); shift-drag selects a box
    box = page.locator("#map").bounding_box()
    v0 = page.url
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 260, box["y"] + 230, steps=4)
    page.mouse.up()
    assert page.url != v0 and page.locator("#map").get_attribute("data-selected") is None
    page.locator("#map").focus()
    page.keyboard.press("0")
    # a lasso around the whole map selects every point; a thin one selects none of the far clusters
    page.click("#lasso-mode")
    corners = [(3, 3), (box["width"] - 3, 3), (box["width"] - 3, box["height"] - 3), (3, box["height"] - 3), (3, 6)]
    page.mouse.move(box["x"] + corners[0][0], box["y"] + corners[0][1])
    page.mouse.down()
    for cx, cy in corners[1:]:
        page.mouse.move(box["x"] + cx, box["y"] + cy, steps=6)
    page.mouse.up()
    assert int(page.locator("#map").get_attribute("data-selected")) == 60
    page.click("#lasso-mode")
    page.click("#box-mode")  # (shift-drag does the same)
    page.mouse.move(box["x"] + 3, box["y"] + 3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 3, box["y"] + box["height"] - 3, steps=8)
    page.mouse.up()
    assert int(page.locator("#map").get_attribute("data-selected")) == 60
    page.shot("06-map-selected")
    page.click("#selection-form button")
    page.wait_for_url("**/selection")
    assert page.locator(".card.image").count() == 60
    expect(page.locator(".selected-count")).to_have_text("60 selected")  # a map selection arrives ticked
    page.select_option("#filter-state", "is-unflagged")  # the one unflagged above
    expect(page.locator(".selected-count")).to_have_text("1 selected")
    page.select_option("#filter-state", "")
    page.shot("07-selection")
    page.click("header button[name=blur]")  # toggling blur here once answered a raw 405 page
    expect(page.locator("header button[name=blur]")).to_have_text("Blur: off")
    assert page.locator(".card.image").count() == 60 and "/selection" in page.url
    page.click("header button[name=blur]")
    expect(page.locator("header button[name=blur]")).to_have_text("Blur: on")

    # search by uploading a file
    query = root / "query.jpg"
    query.write_bytes(encode(drawn_image(1001, (320, 240)), "JPEG"))
    page.goto(base + "/search")
    page.set_input_files("#search-file", str(query))
    with page.expect_navigation():
        page.click("#search-form button")
    hits = page.locator(".card.image.hit").count()
    assert hits >= 5 and page.locator(".query-thumb img").count() == 1
    assert page.locator("select[name=scope]").input_value() == "flagged"
    page.click("header button[name=grey]")  # greyscale once threw the results away
    expect(page.locator("header button[name=grey]")).to_have_text("Greyscale: on")
    assert page.locator(".card.image.hit").count() == hits and "grey" in (page.locator("body").get_attribute("class") or "")
    page.click("header button[name=grey]")
    expect(page.locator("header button[name=grey]")).to_have_text("Greyscale: off")
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


def test_the_map_fits_a_narrow_window(server, page):
    base, _root = server
    page.set_viewport_size({"width": 800, "height": 700})
    page.goto(base + "/map")
    page.wait_for_selector("body[data-map-ready='1']", timeout=20_000)
    width = page.locator("#map").evaluate("c => c.getBoundingClientRect().width")
    scroll = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 800 and scroll <= 800, (width, scroll)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_selection_keyboard_and_double_submits(server, page):
    """Runs after the journey (same signed-in page): select all N, shift ranges, keys, one action per
    double click, Enter in an empty reason box."""
    base, _root = server
    page.goto(base + "/clusters")
    page.locator("article.card.cluster[data-cluster] h2 a").nth(1).click()
    page.wait_for_url("**/clusters/*")
    total = page.locator("form.members").get_attribute("data-total")
    page.click("button.select-every")
    expect(page.locator(".selected-count").first).to_have_text(f"{total} selected")
    page.click("button.select-none")
    expect(page.locator(".selected-count").first).to_have_text("0 selected")
    picks = page.locator("form.members input.pick")
    picks.nth(0).click()
    picks.nth(4).click(modifiers=["Shift"])
    expect(page.locator(".selected-count").first).to_have_text("5 selected")
    assert all(picks.nth(i).is_checked() for i in range(5)) and not picks.nth(5).is_checked()
    # selected cards are highlighted
    outline = page.locator("form.members .card.image").first.evaluate("e => getComputedStyle(e).outlineStyle")
    assert outline == "solid"
    page.click("button.select-none")
    page.locator("h1").click()
    page.keyboard.press("j")
    page.keyboard.press("j")
    page.keyboard.press("x")
    expect(page.locator(".selected-count").first).to_have_text("1 selected")
    assert picks.nth(1).is_checked()
    # the selection survives leaving and coming back
    url = page.url
    page.goto(base + "/clusters")
    page.goto(url)
    expect(page.locator(".selected-count").first).to_have_text("1 selected")
    # Enter in an empty reason box: nothing is sent, no error page
    page.locator("form.members input[name=reason]").press("Enter")
    assert page.url == url and page.locator("h1").count() == 1
    # a double click on "Unflag selected" is one action
    page.fill("form.members input[name=reason]", "false positive")
    page.dblclick("button:has-text('Unflag selected')")
    expect(page.locator(".flash")).to_contain_text("Unflagged 1 image(s).")
    page.wait_for_timeout(500)
    page.goto(base + "/audit?action=unflag")
    rows = page.locator("table.audit tbody tr").all_inner_texts()
    assert sum("false positive" in r for r in rows) == 1, rows
    assert not page.problems, page.problems
