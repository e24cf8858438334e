"""The built docs site, as a reader sees it: headless Chromium on the home page,
the API reference and the search, with screenshots saved for review.

The site is the one ``.ci/run`` built (``KMS_DOCS_SITE``), else this test
builds it with ``mkdocs build --strict`` into ``site/``. Screenshots go to
``<site>/_screenshots/``. Without Chromium (Debian's ``chromium`` and
``chromium-driver``), selenium or mkdocs the test skips locally; under CI
(``CI`` set) it fails instead.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import kms_async
import kms_async.aws
import kms_async.pkcs11

ROOT = pathlib.Path(__file__).resolve().parents[1]
# How long a page may take to show what the test waits for.
_WAIT = 20.0


def _missing() -> str | None:
    for binary in ("chromium", "chromedriver"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed; apt-get install chromium chromium-driver"
    for module, extra in (("selenium", "docs"), ("mkdocs", "docs")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed; pip install -e '.[{extra}]'"
    return None


@pytest.fixture(scope="module")
def site() -> pathlib.Path:
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must check the docs site in a browser")
        pytest.skip(missing)
    built = os.environ.get("KMS_DOCS_SITE")
    if built:
        path = pathlib.Path(built).resolve()
        assert (path / "index.html").exists(), f"KMS_DOCS_SITE={built} holds no built site"
        return path
    path = ROOT / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr}"
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def base_url(site: pathlib.Path) -> Iterator[str]:
    """The site over HTTP on loopback (the search loads its index with fetch)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="docs-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    # The Debian driver, named explicitly: selenium then never tries to download one.
    service = Service(executable_path=str(shutil.which("chromedriver")))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def _page(browser: Any, site: pathlib.Path, url: str, shot: str) -> Iterator[Any]:
    """Open ``url``; on the way out, save a screenshot and check the console had no error."""
    browser.get(url)
    try:
        yield browser
    finally:
        shots = site / "_screenshots"
        shots.mkdir(exist_ok=True)
        browser.save_screenshot(str(shots / f"{shot}.png"))
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{url}: errors in the browser console: {errors}"


def _wait(browser: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, _WAIT).until(condition, message=what)


def _home_page(browser: Any, site: pathlib.Path, base_url: str) -> None:
    from selenium.webdriver.common.by import By

    with _page(browser, site, base_url, "home"):
        assert "kms_async" in browser.title
        heading = browser.find_element(By.CSS_SELECTOR, "article h1")
        assert heading.text.strip() == "kms_async"
        tabs = {a.text.strip() for a in browser.find_elements(By.CSS_SELECTOR, "nav a")}
        assert {"Tutorial", "How-to guides", "Reference"} <= {t.split("\n")[0] for t in tabs}
        code = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "article pre code")]
        assert any("KMS.open" in c for c in code), code


def _api_reference_lists_every_public_name(browser: Any, site: pathlib.Path, base_url: str) -> None:
    from selenium.webdriver.common.by import By

    with _page(browser, site, base_url + "reference/api/", "api-reference"):
        ids = set(
            browser.execute_script(
                "return Array.from(document.querySelectorAll('[id^=\"kms_async\"]'), e => e.id)"
            )
        )
        expected = {f"kms_async.{name}" for name in kms_async.__all__}
        expected |= {f"kms_async.aws.{name}" for name in kms_async.aws.__all__}
        expected |= {f"kms_async.pkcs11.{name}" for name in kms_async.pkcs11.__all__}
        assert not expected - ids, f"names missing from the API reference: {expected - ids}"
        encrypt = browser.find_element(By.ID, "kms_async.KMS.encrypt")
        browser.execute_script("arguments[0].scrollIntoView()", encrypt)
        section = encrypt.find_element(By.XPATH, "./..")
        assert "aad" in section.text


def _search_finds_the_api(browser: Any, site: pathlib.Path, base_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready

    with _page(browser, site, base_url, "search"):
        browser.find_element(By.CSS_SELECTOR, "label.md-search__icon, .md-search__input").click()
        box = _wait(
            browser,
            ready.element_to_be_clickable((By.CSS_SELECTOR, "input.md-search__input")),
            "the search box",
        )
        box.send_keys("rotate_keys_many")
        results = _wait(
            browser,
            lambda b: b.find_elements(By.CSS_SELECTOR, ".md-search-result__item a"),
            "search results for rotate_keys_many",
        )
        targets = [r.get_attribute("href") for r in results]
        assert any("reference/api/" in t for t in targets), targets


def _figures_and_generated_pages_render(browser: Any, site: pathlib.Path, base_url: str) -> None:
    from selenium.webdriver.common.by import By

    def loaded(selector: str) -> bool:
        image = browser.find_element(By.CSS_SELECTOR, selector)
        return bool(
            browser.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", image
            )
        )

    with _page(browser, site, base_url + "benchmarks/", "benchmarks"):
        assert _wait(browser, lambda b: loaded("img[src$='hot_path.png']"), "the chart")
    with _page(browser, site, base_url + "explanation/key-hierarchy/", "key-hierarchy"):
        assert _wait(browser, lambda b: loaded("img[src$='key-hierarchy.svg']"), "the diagram")
    with _page(browser, site, base_url + "reference/cli/", "cli-reference"):
        headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "article h2")]
        assert "kms-async rotate" in " ".join(headings)


def test_the_site_as_a_reader_sees_it(browser: Any, site: pathlib.Path, base_url: str) -> None:
    """One test, so one worker builds the site and one browser visits it."""
    _home_page(browser, site, base_url)
    _api_reference_lists_every_public_name(browser, site, base_url)
    _search_finds_the_api(browser, site, base_url)
    _figures_and_generated_pages_render(browser, site, base_url)
