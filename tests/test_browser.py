"""End to end in a real browser: Playwright driving Debian's Chromium against `flagmatch serve`.
Screenshots of every page are kept in test-artifacts/screenshots/."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.helpers.web import TOKEN, build_clustered_home
from PIL import Image

from tests.helpers import child_env, drawn_image, encode, start_server, stop_server

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
    # the level below the cluster: its copies of one picture, together
    # (tests/test_families.py checks the families on photos; these flat drawings keep too few corners to verify)
    shown = page.locator(".card.image").count()
    page.locator("p.sorts a", has_text="copies together").click()
    page.wait_for_url("**sort=copies**")
    expect(page.locator("p.sorts strong")).to_have_text("copies together")
    assert page.locator(".card.image").count() == shown
    page.goto(cluster_url)

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
    page.select_option("#filter-state", "is-unflagged")  # the one unflagged above: the rest stays selected
    expect(page.locator(".selected-count")).to_contain_text("1 selected shown (59 more selected, hidden")
    page.select_option("#filter-state", "")
    expect(page.locator(".selected-count")).to_have_text("60 selected")
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


# ---------------------------------------------------------------------- what moderators found (one test each)

def _api(page, base: str, path: str) -> dict:
    """The catalog's own answer, through the JSON API with the token (not the page that was clicked)."""
    r = page.request.get(base + "/api/v1" + path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.ok, r.text()
    return r.json()


def _signed_in(page, base: str) -> None:
    page.goto(base + "/clusters")
    if "/login" in page.url:
        page.fill("input[name=token]", TOKEN)
        page.click("form button:has-text('Sign in')")
        page.wait_for_url(base + "/clusters")


def _first_cluster(page, base: str, nth: int = 0) -> str:
    _signed_in(page, base)
    page.locator("article.card.cluster[data-cluster] h2 a").nth(nth).click()
    page.wait_for_url("**/clusters/*")
    return page.url


def _open_map_selection(page, base: str) -> None:
    """Everything on the map, reset to the whole view, opened as the selection page."""
    page.goto(base + "/map")
    page.wait_for_selector("body[data-map-ready='1']", timeout=20_000)
    page.locator("#map").focus()
    page.keyboard.press("0")
    page.keyboard.press("Enter")  # everything in view
    page.click("#selection-form button")
    page.wait_for_url("**/selection")


def test_the_image_pages_flag_and_unflag_act_on_that_image(server, page):
    """Bug 1: Unflag on an image's page said "Select at least one image first." and changed nothing."""
    base, _root = server
    _signed_in(page, base)
    flagged = next(i for i in range(1, 80) if _api(page, base, f"/images/{i}")["flagged"])
    page.goto(f"{base}/images/{flagged}")
    page.fill("form.inline input[name=reason]", "a poster, not unsafe")
    with page.expect_navigation():
        page.click("form.inline button:has-text('Unflag')")
    img = _api(page, base, f"/images/{flagged}")
    assert img["flagged"] is False and img["history"][-1]["reason"] == "a poster, not unsafe"
    assert "a poster, not unsafe" in page.locator("ul.history").inner_text()
    page.fill("form.inline input[name=reason]", "it is, after all")
    page.fill("form.inline input[name=label]", "adult_nudity")
    with page.expect_navigation():
        page.click("form.inline button:has-text('Flag')")
    img = _api(page, base, f"/images/{flagged}")
    assert img["flagged"] is True and img["flag"]["label"] == "adult_nudity"
    assert not page.problems, page.problems


def test_the_decision_bar_survives_an_ended_session(server, page):
    """Bug 3: after signing out in another tab, Confirm answered "That did not work." and lost the form."""
    base, _root = server
    url = _first_cluster(page, base, 2)
    page.fill("#decision-form input[name=name]", "Poster wall")
    page.fill("#decision-form input[name=note]", "checked every tile")
    page.select_option("#decision-form select[name=reason_code]", "matches_policy")
    other = page.context.new_page()
    other.goto(base + "/clusters")
    other.click("header button:has-text('Sign out')")
    other.wait_for_url("**/login*")
    other.close()
    page.click("#decision-form button:has-text('Confirm')")
    page.wait_for_url(re.compile(r"/login"))
    assert "session had ended" in page.locator(".flash").inner_text()
    page.fill("input[name=token]", TOKEN)
    page.click("form button:has-text('Sign in')")
    page.wait_for_url(url)
    assert page.locator("#decision-form input[name=name]").input_value() == "Poster wall"
    assert page.locator("#decision-form input[name=note]").input_value() == "checked every tile"
    assert page.locator("#decision-form select[name=reason_code]").input_value() == "matches_policy"
    expect(page.locator("#cluster-status")).not_to_have_text("confirmed")  # nothing was decided while signed out
    page.problems.clear()  # (the 401 of the refused submit is the point of this test)


def test_undo_is_there_right_after_an_in_place_decision_and_keeps_the_name(server, page):
    """Bug 4: Undo appeared only after a reload, and then cleared the name given with the decision."""
    base, _root = server
    url = _first_cluster(page, base, 3)
    assert page.locator("#undo-form").is_hidden()
    page.fill("#decision-form input[name=name]", "Sticker sheet")
    page.select_option("#decision-form select[name=reason_code]", "matches_policy")
    page.click("#decision-form button:has-text('Dismiss')")
    expect(page.locator("#cluster-status")).to_have_text("dismissed")
    expect(page.locator("#undo-form")).to_be_visible()
    cid = int(url.rstrip("/").rsplit("/", 1)[1])
    with page.expect_navigation():
        page.click("#undo")
    expect(page.locator("#cluster-status")).to_have_text("unreviewed")
    assert "Sticker sheet" in page.locator("h1").inner_text()
    # the flags the dismissal took are back, in the catalog
    members = page.locator("form.members .card.image[data-id]").evaluate_all("cs => cs.map(c => +c.dataset.id)")
    assert members and all(_api(page, base, f"/images/{i}")["flagged"] for i in members[:5])
    events = _api(page, base, f"/audit?target=cluster:{cid}")["events"]
    assert [e["action"] for e in events[:2]] == ["cluster_undo", "cluster_dismissed"]
    assert not page.problems, page.problems


def test_select_all_counts_each_member_once(server, page):
    """Bug 5: "Members (33)" offered "Select all 34" (outliers counted twice)."""
    base, _root = server
    _first_cluster(page, base, 1)
    heading = int(page.locator("form.members h2 .count").inner_text().strip("()").split(",")[0])
    expect(page.locator("button.select-every")).to_have_text(f"Select all {heading}")
    page.click("button.select-every")
    expect(page.locator(".selected-count").first).to_have_text(f"{heading} selected")
    page.click("button.select-none")


def test_the_audit_table_reads_at_1280_px(server, page):
    """Bug 6: the #, who, what and target columns wrapped one letter per line."""
    base, _root = server
    _signed_in(page, base)
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(base + "/audit")
    line = page.locator("table.audit tbody tr").first.locator("td.n").evaluate(
        "e => parseFloat(getComputedStyle(e).lineHeight) || 20")
    # the height of each cell's text (the cell itself is as tall as its row, which the detail column sets)
    text_heights = """cs => cs.slice(0, 40).map(c => { const r = document.createRange(); r.selectNodeContents(c);
                                                      return r.getBoundingClientRect().height; })"""
    for col, lines in (("n", 1), ("when", 1), ("what", 1), ("who", 2), ("target", 2)):
        heights = page.locator(f"table.audit tbody td.{col}").evaluate_all(text_heights)
        assert max(heights) <= lines * line * 1.3, (col, max(heights), line)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_the_maps_selection_stays_in_view_and_survives_back(server, page):
    """Bug 7: "Open selection" fell below an 800-px window; the selection was gone after Back."""
    base, _root = server
    _signed_in(page, base)
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(base + "/map")
    page.wait_for_selector("body[data-map-ready='1']", timeout=20_000)
    box = page.locator("#map").bounding_box()
    page.click("#box-mode")
    page.mouse.move(box["x"] + 3, box["y"] + 3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 3, box["y"] + min(box["height"], 700) - 3, steps=8)
    page.mouse.up()
    n = int(page.locator("#map").get_attribute("data-selected"))
    assert n > 0
    button = page.locator("#selection-form button").bounding_box()
    assert button["y"] + button["height"] <= 800, button
    page.click("#selection-form button")
    page.wait_for_url("**/selection")
    page.go_back()
    page.wait_for_selector("body[data-map-ready='1']", timeout=20_000)
    expect(page.locator("#selection-count")).to_have_text(f"{n} selected")
    assert int(page.locator("#map").get_attribute("data-selected")) == n
    page.set_viewport_size({"width": 1280, "height": 900})


def test_selection_filters_hide_without_deselecting(server, page):
    """Bug 8: a filter silently dropped what it hid from the selection (168 -> 15)."""
    base, _root = server
    _signed_in(page, base)
    _open_map_selection(page, base)
    total = page.locator(".card.image").count()
    expect(page.locator(".selected-count")).to_have_text(f"{total} selected")
    page.select_option("#filter-state", "is-unflagged")
    shown = page.locator(".card.image:not([hidden])").count()
    assert 0 < shown < total
    expect(page.locator(".selected-count")).to_contain_text(f"{shown} selected shown ({total - shown} more")
    # an action applies to what is shown: flag the unflagged ones, the flagged stay as they were
    hidden_ids = page.locator(".card.image[hidden]").evaluate_all("cs => cs.map(c => +c.dataset.id)")
    page.fill("input[name=reason]", "seen on the map")
    page.click("button:text-is('Flag selected')")
    expect(page.locator(".flash")).to_contain_text(f"Flagged {shown} image(s).")
    assert all(_api(page, base, f"/images/{i}")["flagged"] for i in hidden_ids[:5])
    page.select_option("#filter-state", "")
    expect(page.locator(".selected-count")).to_have_text(f"{total - shown} selected")


def test_a_bad_audit_filter_keeps_the_form(server, page):
    """Bug 9: since=yesterday replaced the page with a bare message."""
    base, _root = server
    _signed_in(page, base)
    resp = page.goto(base + "/audit?since=yesterday&actor=rita")
    assert resp.status == 400
    assert page.locator("form.filters input[name=since]").input_value() == "yesterday"
    assert page.locator("form.filters input[name=actor]").input_value() == "rita"
    assert "ISO 8601" in page.locator("#filter-problem").inner_text()
    assert page.locator("header.top nav").count() == 1
    page.problems.clear()


def test_every_error_page_is_styled_with_a_way_back(server, page):
    """Bug 10: 403, 405 and malformed ids showed Werkzeug's bare pages."""
    base, _root = server
    _signed_in(page, base)
    for path, status in (("/clusters/abc", 404), ("/clusters/123456789012345678901", 404), ("/logout", 405),
                         ("/images/999999999", 404), ("/no/such/page", 404)):
        resp = page.goto(base + path)
        assert resp.status == status, path
        assert page.locator("header.top nav").count() == 1, path  # the viewer's own page, with its navigation
        assert page.locator("main h1").count() == 1 and page.locator("main a[href='/clusters']").count() >= 1, path
    # a form without its CSRF token: 403, styled
    page.goto(base + "/clusters")
    page.evaluate("""() => { const f = document.createElement('form'); f.method = 'post';
        f.action = '/clusters/1/name'; document.body.appendChild(f); f.submit(); }""")
    page.wait_for_load_state()
    assert "Not allowed" in page.locator("main h1").inner_text() and page.locator("header.top nav").count() == 1
    page.problems.clear()


def test_the_larger_view_is_blurred_until_revealed_and_blur_off_hides_reveal(server, page):
    """Bug 11: "View larger" showed the unblurred original with blur on; after "blur off" the page kept
    every Reveal button."""
    import io

    import numpy as np
    from PIL import Image
    base, _root = server
    _signed_in(page, base)
    target = next(i for i in range(1, 80) if not _api(page, base, f"/images/{i}").get("deleted", False))
    page.goto(f"{base}/images/{target}")
    href = page.locator("#view-large").get_attribute("href")

    def sharpness() -> float:
        r = page.request.get(base + href)
        a = np.asarray(Image.open(io.BytesIO(r.body())).convert("L"), np.float32)
        return float(np.abs(np.diff(a, axis=1)).mean())
    blurred = sharpness()
    page.locator("figure.thumb button.reveal").first.click()
    expect(page.locator("figure.thumb img").first).to_have_attribute("src", re.compile("clear=1"))
    revealed = sharpness()
    assert revealed > 3 * blurred, (blurred, revealed)
    events = _api(page, base, f"/audit?target=image:{target}&action=view_large")["events"]
    assert [e["detail"]["blurred"] for e in events[:2]] == [False, True]
    # blur off for the session: nothing left to reveal, so no Reveal buttons
    _first_cluster(page, base, 0)
    assert page.locator("figure.thumb button.reveal:visible").count() > 0
    page.click("header button[name=blur]")
    expect(page.locator("header button[name=blur]")).to_have_text("Blur: off")
    assert page.locator("figure.thumb button.reveal:visible").count() == 0
    page.click("header button[name=blur]")
    expect(page.locator("header button[name=blur]")).to_have_text("Blur: on")
    assert page.locator("figure.thumb button.reveal:visible").count() > 0


def test_a_bulk_unflag_asks_first_and_can_be_undone(server, page):
    """Undo everywhere: a bulk unflag of 20 or more asks for confirmation, and its message carries an Undo that
    flags every image again with the label it had (one audited action, checked in the catalog)."""
    base, _root = server
    _signed_in(page, base)
    _open_map_selection(page, base)
    ids = page.locator(".card.image").evaluate_all("cs => cs.map(c => +c.dataset.id)")
    before = {i: _api(page, base, f"/images/{i}") for i in ids}
    still_flagged = [i for i, img in before.items() if img["flagged"]]
    assert len(still_flagged) >= 20
    dialogs: list[str] = []
    page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.fill("input[name=reason]", "all posters")
    page.click("button:text-is('Unflag selected')")
    page.wait_for_timeout(300)
    assert dialogs == [f"Unflag {len(ids)} images?"]
    assert all(_api(page, base, f"/images/{i}")["flagged"] for i in still_flagged[:5])  # declined: nothing changed
    page.once("dialog", lambda d: d.accept())
    page.click("button:text-is('Unflag selected')")
    expect(page.locator(".flash")).to_contain_text(f"Unflagged {len(still_flagged)} image(s).")
    assert not any(_api(page, base, f"/images/{i}")["flagged"] for i in still_flagged)
    page.click(".flash button.undo-change")
    expect(page.locator(".flash")).to_contain_text(f"Undone: {len(still_flagged)} image(s) flagged again.")
    for i in still_flagged:
        img = _api(page, base, f"/images/{i}")
        assert img["flagged"] and img["flag"]["label"] == before[i]["flag"]["label"], i
    assert page.locator(".card.image.is-flagged").count() == len(still_flagged)
    events = _api(page, base, "/audit?action=undo_flags")["events"]
    assert events and sorted(events[0]["detail"]["ids"]) == sorted(still_flagged)
    assert not page.problems, page.problems


def test_the_flow_goes_on_to_the_next_unreviewed_cluster(server, page):
    """Keep the flow going: "Next unreviewed" on the cluster list and the cluster page, and the decision that
    moved on is confirmed on the next cluster's page."""
    base, _root = server
    _signed_in(page, base)
    page.click("#next-unreviewed")
    page.wait_for_url("**/clusters/*")
    first = page.url
    assert page.locator("#cluster-status").inner_text() == "unreviewed"
    page.select_option("#decision-form select[name=reason_code]", "matches_policy")
    page.check("#decision-form input[name=next]")
    with page.expect_navigation():
        page.click("#decision-form button:has-text('Confirm')")
    assert page.url != first
    expect(page.locator(".flash")).to_contain_text("Previous decision saved")
    assert page.locator("#cluster-status").inner_text() == "unreviewed"
    cid = int(first.rstrip("/").rsplit("/", 1)[1])
    assert _api(page, base, f"/audit?target=cluster:{cid}")["events"][0]["action"] == "cluster_confirmed"
    with page.expect_navigation():
        page.click("#next-unreviewed")
    assert page.url != first


def test_every_link_from_the_cluster_list_answers_a_styled_page(server, page):
    """A crawler from the cluster list: every same-site link (pages, thumbnails, JSON) answers without a 5xx,
    and every HTML page is the viewer's own (its navigation, never a bare error page)."""
    base, _root = server
    _signed_in(page, base)
    seen, todo, pages = set(), ["/clusters"], 0
    while todo and len(seen) < 400:
        path = todo.pop(0)
        if path in seen:
            continue
        seen.add(path)
        r = page.request.get(base + path)
        assert r.status < 500, (path, r.status)
        if "text/html" not in r.headers.get("content-type", ""):
            continue
        html = r.text()
        pages += 1
        assert 'class="top"' in html and "<nav>" in html, path
        for href in re.findall(r'href="(/[^"#]*)"', html):
            href = href.replace("&amp;", "&")
            if href.startswith("/static") or "logout" in href or href in seen:
                continue
            if href.startswith(("/images/", "/clusters", "/map", "/search", "/queue", "/model", "/banks", "/audit",
                                "/api/v1/images", "/selection")) and href.count("page=") <= 1:
                todo.append(href)
    assert pages >= 20, pages


PAGES = ("/clusters", "/clusters/1", "/clusters/1/sweep", "/clusters/unclustered", "/images/5", "/map", "/search",
         "/queue", "/model", "/banks", "/audit")


def test_every_form_refuses_bad_input_without_acting(server, page):
    """Every POST form of every page, sent with each text field overlong and then with every field empty: a 4xx
    (or the page again with the message) — never a 5xx — and nothing recorded in the catalog's audit log."""
    base, _root = server
    _signed_in(page, base)
    forms: list[tuple[str, str, dict[str, str]]] = []
    for path in PAGES:
        page.goto(base + path)
        found = page.evaluate("""() => Array.from(document.querySelectorAll('form[method=post]')).flatMap(f => {
            const fields = {}; const texts = [];
            for (const el of f.elements) {
              if (!el.name) continue;
              if (el.type === 'hidden') fields[el.name] = el.value;
              else if (el.type === 'text' || el.tagName === 'TEXTAREA') texts.push(el.name);
            }
            const actions = Array.from(f.querySelectorAll('button[formaction]')).map(b => b.getAttribute('formaction'));
            return (actions.length ? actions : [f.getAttribute('action') || location.pathname])
              .map(a => [a, texts, fields]); })""")
        for action, texts, fields in found:
            if action in ("/logout",) or action.startswith("/login") or not texts:
                continue  # (a form without a field to get wrong — undo, a switch — is a button its own test clicks)
            forms.append((action, texts, fields))
    assert {"/images/flag", "/images/unflag", "/clusters/1/decision", "/images/5/delete"} <= {a for a, _, _ in forms}
    before = len(_api(page, base, "/audit?limit=1000")["events"])
    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    for action, texts, fields in forms:
        for bad in ({t: "x" * 3000 for t in texts} | {"ids": "1,abc"}, {"csrf": csrf}):
            data = {**fields, "csrf": csrf, **bad}
            r = page.request.post(base + action, form=data, max_redirects=0,
                                  headers={"X-Requested-With": "fetch", "X-CSRF-Token": csrf})
            assert r.status < 500, (action, bad.keys(), r.status, r.text()[:300])
            assert r.status >= 300 or action in ("/preferences", "/search", "/selection"), (action, r.status)
    after = _api(page, base, "/audit?limit=1000")["events"]
    acted = [e for e in after[:len(after) - before] if e["action"] not in ("blur_on", "blur_off", "blur_strength")]
    assert acted == [], acted


def test_a_videos_page_shows_its_keyframes_blurred_and_reveals_one_at_a_time(server, page, tmp_path):
    """A video's page: its keyframe strip with offsets, blurred, no player; Reveal shows one frame (recorded in
    the audit log under that keyframe), the rest stay blurred; the search page takes a clip and says where in
    the stored video it matched."""
    import io

    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from flagmatch.cli import main
    from tests.helpers import clean_env, photo_image
    from tests.helpers.video import slideshow
    base, root = server
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(slideshow([photo_image(s) for s in (700, 701, 702)], seconds_each=3.0))
    out = CliRunner().invoke(main, ["ingest", str(clip), "--flag-threshold", "0"],
                             env=clean_env({"FLAGMATCH_HOME": str(root / "home")}), catch_exceptions=False)
    assert out.exit_code == 0, out.output
    _signed_in(page, base)
    found = _api(page, base, f"/images/{_sha_id(page, base, clip)}")
    assert found["kind"] == "video"
    frames = _api(page, base, f"/images/{found['id']}/keyframes")["keyframes"]
    assert len(frames) >= 3 and frames[0]["offset_s"] == 0
    page.goto(f"{base}/images/{found['id']}")
    assert page.locator("h1").inner_text().startswith("Video #")
    strip = page.locator("#keyframes figure.keyframe")
    expect(strip).to_have_count(len(frames))
    assert page.locator("video").count() == 0 and page.locator("#view-large").count() == 0
    assert "3.0 s" in strip.nth(1).inner_text() or "3.0 s" in page.locator("#keyframes").inner_text()
    page.shot("video-keyframes")

    def sharpness(src: str) -> float:
        a = np.asarray(Image.open(io.BytesIO(page.request.get(base + src).body())).convert("L"), np.float32)
        return float(np.abs(np.diff(a, axis=1)).mean())
    blurred = sharpness(strip.nth(1).locator("img").get_attribute("src"))
    strip.nth(1).locator("button.reveal").click()
    expect(strip.nth(1).locator("img")).to_have_attribute("src", re.compile("clear=1"))
    assert sharpness(strip.nth(1).locator("img").get_attribute("src")) > 2 * blurred
    assert strip.nth(0).locator("button.reveal").count() == 1 and strip.nth(2).locator("button.reveal").count() == 1
    events = _api(page, base, f"/audit?target=keyframe:{frames[1]['id']}&action=reveal")["events"]
    assert len(events) == 1 and events[0]["detail"]["image_id"] == found["id"]
    # the search page takes a clip, and a video hit says where it matched
    page.goto(base + "/search")
    page.set_input_files("#search-file", str(clip))
    with page.expect_navigation():
        page.click("#search-form button:has-text('Search')")
    assert "(video, " in page.locator(".query .meta").inner_text()
    hit = page.locator(f".card.hit[data-id='{found['id']}']")
    expect(hit).to_have_count(1)
    assert " s" in hit.locator(".frames").inner_text()
    page.shot("video-search")
    assert not page.problems, page.problems


def _sha_id(page, base: str, path: Path) -> int:
    import hashlib
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    r = page.request.post(base + "/api/v1/search", data=json.dumps({"sha256": sha, "scope": "all"}),
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.ok, r.text()
    return int(r.json()["results"][0]["query"]["known_id"])


def test_a_hit_through_a_flagged_pictures_window_says_which_part(server, page, tiny_model_dir):
    """After `flagmatch regions`, a quarter cut out of a flagged picture finds it through its window, and the
    search page says which part of the flagged picture matched (in its pixels); the API says the same."""
    base, root = server
    env = child_env(FLAGMATCH_HOME=str(root / "home"), FLAGMATCH_MODEL=str(tiny_model_dir), FLAGMATCH_PRECISION="fp32")
    # one picture still flagged after the tests above, and its windows alone (the command's REFs; without them
    # every flagged image gets its nine)
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    store = open_store(Settings.load({"home": str(root / "home")}, environ={}))
    try:
        def flagged(p: Path) -> bool:
            i = store.catalog.resolve(hashlib.sha256(p.read_bytes()).hexdigest())
            return store.catalog.get_many([i])[i].flagged
        path = next(p for p in sorted((root / "in" / "flagged").glob("fam2_*.jpg")) if flagged(p))
    finally:
        store.close()
    done = subprocess.run([sys.executable, "-m", "flagmatch.cli", "regions", hashlib.sha256(path.read_bytes()).hexdigest()],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "1 flagged images added" in done.stdout, done.stdout + done.stderr
    original = Image.open(path)
    query = root / "quarter.png"
    # its top-left quarter at the scale of its thumbnail (256 px wide), where its window was cut
    original.resize((256, 192)).crop((0, 0, 128, 96)).save(query)
    time.sleep(1.0)  # the server looks for a new region file at its next refresh
    _signed_in(page, base)
    page.goto(base + "/search")
    page.set_input_files("#search-file", str(query))
    with page.expect_navigation():
        page.click("#search-form button")
    part = page.locator(".card.image.hit .stored-region").first
    expect(part).to_contain_text("a part of it: (0,0)–(160,120)")
    r = page.request.post(base + "/api/v1/search", multipart={"image": {"name": "q.png", "mimeType": "image/png",
                                                                        "buffer": query.read_bytes()}},
                          headers={"Authorization": f"Bearer {TOKEN}"})
    hits = r.json()["results"][0]["hits"]
    assert any(h["stored_box"] == [0, 0, 160, 120] for h in hits), [h["stored_box"] for h in hits]
    assert not page.problems, page.problems


@pytest.fixture(scope="module")
def family_server(tmp_path_factory, tiny_model_dir, tiny_embedder):
    """A store whose clusters hold copy families: five photos, each as its original, mirror, screenshot frame,
    caption band and rotation (tests/test_families.py's edits), all flagged and clustered."""
    from clustering.job import ClusterParams, run_clustering
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.storage.clusters import ClusterStore
    from tests.test_families import _ingest_families
    root = tmp_path_factory.mktemp("families")
    s = Settings.load({"home": str(root / "home"), "model": str(tiny_model_dir)}, environ={})
    store = open_store(s)
    _ingest_families(root, s, store, tiny_embedder, pictures=5)
    run_clustering(store, ClusterStore(store), ClusterParams(min_cluster_size=3, neighbors=8, seed=7))
    store.close()
    env = dict(FLAGMATCH_HOME=str(root / "home"), FLAGMATCH_MODEL=str(tiny_model_dir),
               FLAGMATCH_API_TOKENS=f"rita:{TOKEN}", FLAGMATCH_PRECISION="fp32")
    proc, base, log = start_server(env, root / "server.log")
    yield base
    stop_server(proc, log)


def test_an_images_copy_family_link_opens_its_cluster_with_the_family_together(family_server, page):
    """From a family member's tile to its page, then its "copy family" link: the cluster opens in the "copies
    together" order, the family's tiles first and in one run, as many as the link said; the API agrees."""
    base = family_server
    _signed_in(page, base)
    member = next(i for i in range(1, 26) if (_api(page, base, f"/images/{i}").get("cluster") or {}).get("family")
                  is not None)
    page.goto(f"{base}/clusters/{_api(page, base, f'/images/{member}')['cluster']['id']}")
    expect(page.locator("#family-count")).to_contain_text("of copies")
    tile = page.locator(".card.image:has(span.family)").first
    family = int(tile.locator("span.family").get_attribute("data-family"))
    tile.locator("a[href*='/images/']").first.click()
    page.wait_for_url("**/images/*")
    image_id = int(page.url.rstrip("/").rsplit("/", 1)[1].split("?")[0])
    link = page.locator("dd a.family")
    expect(link).to_have_text(re.compile(rf"copy family {family} · \d+ copies"))
    size = int(re.search(r"· (\d+) copies", link.inner_text()).group(1))
    facts = _api(page, base, f"/images/{image_id}")["cluster"]
    assert facts["family"] == family and facts["family_size"] == size >= 2
    page.shot("30-image-family-link")
    link.click()
    page.wait_for_url("**sort=copies**")
    expect(page.locator("p.sorts strong")).to_have_text("copies together")
    tags = [int(t.get_attribute("data-family")) for t in page.locator(".card.image span.family").all()]
    runs = [f for k, f in enumerate(tags) if k == 0 or tags[k - 1] != f]
    assert len(runs) == len(set(runs)), tags  # each family's tiles in one run
    assert tags.count(family) == size  # the link's count is the tiles the cluster shows for it
    assert page.locator(f".card.image span.family[data-family='{family}']").first.is_visible()
    page.shot("31-cluster-copies-together")
    assert not page.problems, page.problems
