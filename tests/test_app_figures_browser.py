"""What the visitor sees on the figures, in headless Debian Chromium (Playwright, no browser download): the overlay
keeps "all layers" across a re-run, the KL axis names the end token, the accumulated-attention axis labels decades,
and a failed request leaves no earlier answer on screen. Screenshots go to the test's tmp folder only.

Uses the bundled demo model; a missing assets/demo-vlm is a failure, not a skip.
"""
from __future__ import annotations

import pytest
from PIL import Image

from browser_helpers import wait_idle
from analysis.webapp import display as D
from analysis.webapp import handlers as H
from analysis.webapp import models as M
from analysis.webapp.examples import load_examples

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(app_page):
    return app_page


def wait_for_keep(page, keep_percent: int) -> None:
    page.wait_for_function(
        "(k) => { const t = document.querySelector('#answer-evicted .answer-title');"
        " return t && t.textContent.includes(k + '% of KV kept')"
        " && document.querySelector('#answer-evicted .answer-meta'); }", arg=keep_percent)
    wait_idle(page)


def tick_texts(page, selector: str) -> list[str]:
    """The tick labels once plotly has drawn them (the figure arrives after the answers)."""
    page.wait_for_function("s => document.querySelectorAll(s).length > 0", arg=selector, timeout=60_000)
    return page.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")


def test_figures_as_the_visitor_sees_them(page, tmp_path):
    from analysis import compute_accumulated
    from analysis.ticks import decade_ticks

    ex = load_examples("scene")[0]
    ref = H.run_comparison(Image.open(ex.path), ex.question, M.DEMO, "tgv-kv", 10, 32)
    page.locator("#scene-examples").get_by_text(ex.question, exact=True).first.click()
    wait_for_keep(page, 10)

    # KL axis: every token of the short answer, the end-of-sequence token by its name (never an empty "5:")
    want = [f"{i}:{D._short(x)}" for i, x in enumerate(D.answer_labels(ref)[: len(ref.step_kl)])]
    assert tick_texts(page, "#kl-plot .xtick text") == want
    assert all(t.split(":", 1)[1] for t in want)

    # the overlay stays in "all layers" when a new keep ratio re-runs the comparison
    page.get_by_label("all layers").check()
    page.wait_for_function("() => document.querySelector('#overlay-caption').innerText"
                           ".includes('layers keeping each patch')")
    wait_idle(page)
    box = page.locator("#keep input[type=number]")
    box.fill("50")
    box.press("Enter")
    slider = page.locator("#keep input[type=range]")
    slider.focus()
    slider.blur()
    wait_for_keep(page, 50)
    assert page.get_by_label("all layers").is_checked()
    caption = page.locator("#overlay-caption").inner_text()
    assert "layers keeping each patch" in caption and "colour from dark purple to yellow" in caption
    page.screenshot(path=str(tmp_path / "overlay_all_layers_after_rerun.png"), full_page=True)

    # accumulated attention: one label per decade, the strips named in the order drawn
    run50 = H.run_comparison(Image.open(ex.path), ex.question, M.DEMO, "tgv-kv", 50, 32)
    acc = compute_accumulated(run50.evicted)
    page.get_by_role("tab", name="Accumulated attention").click()
    page.wait_for_selector("#accumulated-plot .js-plotly-plot")
    wait_idle(page)
    assert tick_texts(page, "#accumulated-plot .ytick text") == decade_ticks(acc.accumulated)[1]
    caption = page.locator("#accumulated-caption").inner_text()
    assert "tgv-kv's own evictions are the top row" in caption and "colour from dark purple to yellow" in caption
    page.screenshot(path=str(tmp_path / "accumulated.png"), full_page=True)

    # a failed request: the answers of the earlier run are gone, the message says why
    page.locator("#question textarea").fill("   ")
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#answer-full').innerText.includes('no answer')")
    wait_idle(page)
    for which, earlier in (("full", run50.full.output_text), ("evicted", run50.evicted.output_text)):
        text = page.locator(f"#answer-{which}").inner_text()
        assert H.FAILED_NOTE in text and earlier not in text
    assert H.FAILED_NOTE in page.locator("#metrics").inner_text()
    assert "please type a question" in page.locator("[data-testid=toast-body]").first.inner_text()
    page.screenshot(path=str(tmp_path / "after_error.png"))
