"""The Lesson tab end to end in headless Debian Chromium: a lesson example builds the lesson, the presentation view
fills a 1280x720 screen with large type, the keyboard steps through every step, the export downloads, and the
exported HTML draws every figure with the network blocked.

Screenshots of each step go to pytest's tmp_path (``--basetemp`` chooses where). Uses the bundled demo model and the
rule-chosen lesson examples; a missing model or example index is a failure, not a skip.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from test_app_api import running_app
from browser_helpers import TIMEOUT_MS, wait_idle
from analysis.webapp import lesson as LW
from analysis.webapp import models as M
from analysis.webapp.lesson_examples import load_lesson_examples

pytestmark = pytest.mark.browser

VIEWPORT = {"width": 1280, "height": 720}


def active_key(page) -> str:
    return page.eval_on_selector(".lesson-deck .lesson-step.active", "s => s.dataset.key")


def test_lesson_present_step_export_offline(chromium, tmp_path):
    examples = load_lesson_examples()
    assert examples, "no lesson examples: run python -m analysis.webapp.lesson_examples"
    ex = examples[0]
    expected = LW.build(Image.open(ex.path), ex.question, ex.followup, M.DEMO, ex.keep_percent, 32)
    keys = [s.key for s in expected.steps]

    with running_app() as url:
        page = chromium.new_page(viewport=VIEWPORT, accept_downloads=True)
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.get_by_role("tab", name="Lesson").click()
        page.locator("#lesson-examples").get_by_text(ex.label, exact=True).first.click()
        page.wait_for_function("(n) => document.querySelectorAll('.lesson-deck .lesson-step').length === n",
                               arg=len(keys))
        wait_idle(page)
        assert page.locator("#lesson-followup textarea, #lesson-followup input").first.input_value() == ex.followup
        # every step's text is the one computed from the traces of the same input
        shown = page.eval_on_selector_all(".lesson-deck .lesson-step .lesson-text > p",
                                          "ps => ps.map(p => p.textContent)")
        assert shown == [s.text.replace("**", "") for s in expected.steps]
        failed = page.eval_on_selector_all(".lesson-deck .lesson-step", "ss => ss.map(s => s.dataset.failed)")
        assert failed == ["true" if s.failure else "false" for s in expected.steps]

        # presentation view: the deck fills the screen, body type >= 24 px
        page.locator("body").press("p")
        box = page.locator(".lesson-deck.present").bounding_box()
        assert (box["x"], box["y"], box["width"], box["height"]) == (0, 0, 1280, 720)
        px = page.eval_on_selector(".lesson-deck.present .lesson-step.active .lesson-text p",
                                   "p => parseFloat(getComputedStyle(p).fontSize)")
        assert px >= 24
        for i, key in enumerate(keys):
            assert active_key(page) == key
            assert page.locator(".lesson-deck .lesson-step.active").is_visible()
            assert page.locator(".lesson-counter").inner_text() == f"{i + 1} / {len(keys)}"
            page.screenshot(path=str(tmp_path / f"step{i + 1}_{key}.png"))
            page.keyboard.press("ArrowRight")
        assert active_key(page) == keys[-1]  # stays on the last step
        page.keyboard.press("ArrowLeft")
        assert active_key(page) == keys[-2]
        page.keyboard.press("Home")
        assert active_key(page) == keys[0]
        page.keyboard.press("Escape")
        assert page.locator(".lesson-deck.present").count() == 0

        # export: the HTML and the PDF download
        page.locator("#lesson-export").click()
        page.wait_for_selector("#lesson-files a[download]")
        wait_idle(page)
        links = page.locator("#lesson-files a[download]")
        hrefs = sorted(links.nth(i).get_attribute("href") for i in range(links.count()))
        assert sorted(Path(h.split("?")[0]).suffix for h in hrefs) == [".html", ".pdf"]  # in either order
        saved = {}
        for i in range(links.count()):
            with page.expect_download() as dl:
                links.nth(i).click()
            target = tmp_path / dl.value.suggested_filename
            dl.value.save_as(target)
            saved[target.suffix] = target
        page.close()

    pdf = saved[".pdf"].read_bytes()
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) == len(keys) + 1

    # the exported HTML offline: every request that is not the file itself is aborted and recorded
    context = chromium.new_context(viewport=VIEWPORT)
    blocked: list[str] = []

    def block(route):
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", block)
    offline = context.new_page()
    offline.goto(saved[".html"].as_uri())
    assert offline.locator(".lesson-step").count() == len(keys)
    for i, key in enumerate(keys):
        assert active_key(offline) == key
        step = offline.locator(".lesson-step.active")
        for j in range(step.locator("img").count()):
            assert step.locator("img").nth(j).evaluate("i => i.complete && i.naturalWidth > 0")
        if step.locator("details.lesson-plotly").count():
            step.locator("details.lesson-plotly summary").click()
            offline.wait_for_function("() => document.querySelector('.lesson-step.active .js-plotly-plot .main-svg')")
        offline.screenshot(path=str(tmp_path / f"offline_step{i + 1}_{key}.png"), full_page=True)
        offline.keyboard.press("ArrowRight")
    assert blocked == []
    assert offline.evaluate("() => typeof window.Plotly") == "object"
    context.close()
