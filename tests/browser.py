"""Waiting in the browser tests (the report's and the explorer's); their Chromium is the
``driver`` fixture in conftest.py."""

from __future__ import annotations

WAIT_S = 15


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
