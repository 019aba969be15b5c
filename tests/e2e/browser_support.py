"""Headless Chromium for the web page tests (Debian's chromium + chromium-driver, through Selenium),
started with the flags this machine needs (no sandbox as root, no background networking)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def require_chromium() -> None:
    """Skip the calling module when Chromium is missing (fail instead under CI, where it must be there)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        if os.environ.get("CI"):
            raise RuntimeError("chromium and chromium-driver are required (make system-deps installs them)")
        pytest.skip("chromium/chromedriver not installed (run `make system-deps`)", allow_module_level=True)


def chrome(profile: Path, window: str = "1280,1000") -> Iterator[Any]:
    """A headless Chromium driver with a fresh profile; quits when the generator is closed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={window}",
                 "--lang=en-US"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
