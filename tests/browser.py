"""Headless Chromium for the browser tests (the report's and the explorer's; the ``driver``
fixture in conftest.py) and bench/analyzer.py, and waiting on it."""

from __future__ import annotations

from pathlib import Path

WAIT_S = 15
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def start_chromium(profile: str, console_log: bool = False):
    """A headless Chromium with its profile in the folder ``profile``; ``console_log``: keep
    the page's console messages (``driver.get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def wait(driver, condition):
    """Poll ``condition()`` until it is truthy. A condition that reads an element the page
    has since replaced (a card redrawn between ``find_element`` and ``.text``) is polled
    again rather than failing: the page moved on, so the answer is not in yet."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,)
    ).until(lambda d: condition())


def card_loaded(driver) -> str | None:
    """The explorer's card heading once the card has finished drawing, else None. Read in
    one script so the heading cannot be swapped out between finding and reading it."""
    return driver.execute_script(
        "const c = document.getElementById('card');"
        "return c.getAttribute('aria-busy') === 'false' ? c.querySelector('h2').textContent : null"
    )
