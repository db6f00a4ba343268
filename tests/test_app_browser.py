"""End-to-end in headless Debian Chromium (Playwright for Python, no browser download): example click -> both answers
and the overlay; a new budget updates the evicted side; the trace downloads and loads. Saves screenshots into the
artifacts_dir fixture (a temporary folder; `python -m analysis.webapp.refresh_figures` refreshes the committed ones).

Uses the bundled demo model; a missing assets/demo-vlm is a failure, not a skip.
"""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from browser_helpers import open_tab, wait_idle
from tgvkv import Trace
from analysis.webapp import display as D
from analysis.webapp import handlers as H
from analysis.webapp import models as M
from analysis.webapp.examples import load_examples

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(app_page):
    return app_page


def answer_text(page, which: str) -> str:
    return page.locator(f"#answer-{which} .answer-text").inner_text().strip()


def wait_for_run(page, keep_percent: int) -> None:
    """Both answers for this keep ratio are shown and every pending event (diagnostics included) has finished."""
    page.wait_for_function(
        "(k) => { const t = document.querySelector('#answer-evicted .answer-title');"
        " return t && t.textContent.includes(k + '% of KV kept')"
        " && document.querySelector('#answer-evicted .answer-meta'); }",
        arg=keep_percent)
    wait_idle(page)


def test_example_click_budget_change_and_download(page, tmp_path, artifacts_dir):
    ex = load_examples("scene")[0]
    ref10 = H.run_comparison(Image.open(ex.path), ex.question, M.DEMO, "tgv-kv", 10, 32)
    ref50 = H.run_comparison(Image.open(ex.path), ex.question, M.DEMO, "tgv-kv", 50, 32)

    # 1. one click on an example runs everything
    page.locator("#scene-examples").get_by_text(ex.question, exact=True).first.click()
    wait_for_run(page, 10)
    assert answer_text(page, "full") == ref10.full.output_text == ex.answer
    assert answer_text(page, "evicted") == ref10.evicted.output_text
    page.wait_for_function("() => { const i = document.querySelector('#overlay-image img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    size = page.eval_on_selector("#overlay-image img", "i => [i.naturalWidth, i.naturalHeight]")
    assert size == [480, 480]
    assert "What to notice" in page.locator("#overlay-caption").inner_text()
    assert "KV bytes after prefill" in page.locator("#metrics").inner_text()
    page.screenshot(path=str(artifacts_dir / "app_screenshot.png"), full_page=True)

    # 2. a new budget updates the evicted side (no click needed)
    box = page.locator("#keep input[type=number]")
    box.fill("50")
    box.press("Enter")
    slider = page.locator("#keep input[type=range]")  # releasing the slider re-runs by itself once a run is shown
    slider.focus()
    slider.blur()
    wait_for_run(page, 50)
    assert answer_text(page, "evicted") == ref50.evicted.output_text
    metrics = page.locator("#metrics").inner_text()
    assert D.fmt_bytes(int(ref50.evicted.kv_bytes_kept.sum())) in metrics

    # 3. the Explain tab reads the same run
    open_tab(page, "Explain")
    page.wait_for_selector("text=Step 1 · TVB")
    wait_idle(page)
    page.screenshot(path=str(artifacts_dir / "app_explain.png"), full_page=True)

    # 4. export and download the trace; it loads and equals the shown run
    open_tab(page, "Export")
    page.locator("#export-run").click()
    name = "trace-tgv-kv-keep50.npz"
    link = page.locator(f'#export-files a[download="{name}"]').first
    link.wait_for()
    with page.expect_download() as dl:
        link.click()
    path = tmp_path / name
    dl.value.save_as(path)
    trace = Trace.load(path)
    assert trace.output_text == answer_text(page, "evicted") == ref50.evicted.output_text
    assert trace.keep_ratio == pytest.approx(0.5) and trace.method == "tgv-kv"
    np.testing.assert_array_equal(trace.kept_mask, ref50.evicted.kept_mask)


def test_unknown_word_message_is_shown(page, artifacts_dir):
    """A question with a word the demo model does not know: a visible message names it (no run, no traceback)."""
    from transformers import AutoProcessor

    from tgvkv.loading import DEMO_MODEL_DIR
    from tgvkv.vocabulary import check_known_words
    from analysis.webapp.examples import EXAMPLES_DIR, README_SCENE

    question = "what colour is the circle ?"
    with pytest.raises(ValueError) as expected:
        check_known_words(question, AutoProcessor.from_pretrained(DEMO_MODEL_DIR))
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLES_DIR / README_SCENE))
    page.locator("#question textarea").fill(question)
    page.locator("#run").click()
    shown = page.get_by_text("'colour' is not one of them; did you mean 'color'?").first
    shown.wait_for()
    assert str(expected.value) in shown.inner_text()
    assert "Traceback" not in page.content()
    page.screenshot(path=str(artifacts_dir / "app_unknown_word.png"))
