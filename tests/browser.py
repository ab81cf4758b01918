"""Waiting in the browser tests (the report's and the explorer's); their Chromium is the
``driver`` fixture in conftest.py."""

from __future__ import annotations

WAIT_S = 15


def wait(driver, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: condition())
