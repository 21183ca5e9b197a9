"""Headless Chromium from Debian's packages (`chromium`, `chromium-driver`) driven by Selenium, for the dashboard's
browser tests (tests/test_ui.py) and its cost bench (bench/ui_cost.py). Selenium is pointed at the system's
browser and driver: nothing is downloaded.

`start_chromium` raises BrowserUnavailable, with why, when Chromium cannot start here (not installed, or it fails
to launch); a test skips on exactly that, and on nothing else."""

from __future__ import annotations

import os
import shutil
import tempfile

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

BROWSERS = ("chromium", "chromium-browser")
DRIVERS = ("chromedriver", "chromium.chromedriver")


class BrowserUnavailable(Exception):
    pass


def _which(names: tuple[str, ...], extra_dirs: tuple[str, ...] = ("/usr/lib/chromium",)) -> str | None:
    for name in names:
        found = shutil.which(name) or next((os.path.join(d, name) for d in extra_dirs
                                            if os.access(os.path.join(d, name), os.X_OK)), None)
        if found:
            return found
    return None


def start_chromium(width: int = 1280, height: int = 1000, dark: bool = False) -> webdriver.Chrome:
    """A headless Chromium with its console log kept (driver.get_log("browser")). Quit it when done."""
    binary, driver_path = _which(BROWSERS), _which(DRIVERS)
    if binary is None or driver_path is None:
        raise BrowserUnavailable("Chromium or its driver is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="raftdzmq-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    if dark:
        options.add_argument("--force-dark-mode")
        options.add_argument("--blink-settings=preferredColorScheme=0")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except WebDriverException as e:
        shutil.rmtree(profile, ignore_errors=True)
        raise BrowserUnavailable(f"Chromium could not start: {e.msg or e}".splitlines()[0]) from None
    driver._raftdzmq_profile = profile  # type: ignore[attr-defined]
    return driver


def quit_chromium(driver: webdriver.Chrome) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(getattr(driver, "_raftdzmq_profile", ""), ignore_errors=True)


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The console's messages of level SEVERE since the last call (JavaScript errors, failed loads)."""
    return [f"{e.get('level')}: {e.get('message')}" for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
