"""A headless Chromium driven by Selenium through the system ``chromedriver``, for the dashboard
tests. Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (the ``test``
extra). Without them a test using it is skipped with the reason, except on CI (``CI=true``), where
it fails: ``.ci/services.sh chromium`` installs them there, and a browser test that silently stops
running is worse than none."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

ON_CI = os.environ.get("CI") == "true"


def _chromium() -> str | None:
    return next((p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None)


def _why_not() -> str | None:
    if _chromium() is None:
        return "chromium is not installed (apt-get install chromium chromium-driver)"
    if shutil.which("chromedriver") is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    why = _why_not()
    if why is not None:
        if ON_CI:
            pytest.fail(f"the dashboard browser test must run on CI: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(_chromium())
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    # The system driver, named explicitly: Selenium must not try to download one.
    driver = webdriver.Chrome(service=Service(str(shutil.which("chromedriver"))), options=options)
    try:
        yield driver
    finally:
        driver.quit()
