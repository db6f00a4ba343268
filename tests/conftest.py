import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # tiny_models helpers

import repo_guard  # noqa: E402
from browser_helpers import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_BEFORE = pytest.StashKey[dict]()


def pytest_addoption(parser):
    parser.addoption("--artifacts-dir", default=None, type=Path,
                     help="write the app screenshots and the load-test report here (default: a temporary folder; "
                          "`python -m analysis.webapp.refresh_figures` passes results/ to refresh the committed ones)")


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: end-to-end tests in headless Chromium")
    config.addinivalue_line("markers", "slow: tests that take more than a few seconds")


@pytest.fixture(scope="session")
def artifacts_dir(request, tmp_path_factory) -> Path:
    """Where tests put pictures and reports meant for people: a temporary folder unless --artifacts-dir is given."""
    given = request.config.getoption("--artifacts-dir")
    if given is None:
        return tmp_path_factory.mktemp("artifacts")
    given.mkdir(parents=True, exist_ok=True)
    return given


@pytest.fixture(scope="module")
def chromium():
    """Headless Debian Chromium (Playwright), one per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app_page(chromium):
    """The real app (demo model) served from a thread, open in a 1440x1000 page that accepts downloads."""
    from test_app_api import running_app

    with running_app() as url:
        page = chromium.new_page(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#run")
        yield page
        page.close()


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = repo_guard.snapshot(REPO)


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    if before is None:  # not a git checkout
        return
    after = repo_guard.snapshot(REPO)
    changed = repo_guard.changes(before, after or {}, session.config.getoption("--artifacts-dir"), REPO)
    if changed:
        session.config.get_terminal_writer().line(
            "tests wrote into the repository (outputs belong in tmp_path / the artifacts_dir fixture): "
            + ", ".join(changed), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

