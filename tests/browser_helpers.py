"""What the browser tests share: Debian's Chromium with the flags a container needs (never a downloaded browser),
and the waits that tell when the page has finished every pending event. The fixtures are in conftest.py."""
from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
TIMEOUT_MS = 120_000  # a shared CPU core can take a minute for a run with every diagnostic


def wait_idle(page) -> None:
    """Every status tracker on the page is hidden: no event is pending."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=status-tracker]')]"
                           ".every(e => e.classList.contains('hide'))")


def open_tab(page, name: str) -> None:
    """Click a tab as a visitor would: in the tab row, or in Gradio's overflow menu ("...") when the row is full."""
    tab = page.get_by_role("tab", name=name)
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.locator(".overflow-menu").locator("button").first.click()
    page.locator(".overflow-dropdown").get_by_role("button", name=name).first.click()
