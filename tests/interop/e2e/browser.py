"""Headless Chromium from the distribution (`chromium`, `chromium-driver`), driven by selenium.

No browser is downloaded: selenium gets the driver's path, so Selenium Manager stays idle. The
flags are the ones that work in a container without a sandbox, GPU, D-Bus or network besides
loopback; every browser gets a fresh profile.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

REPO_ROOT = Path(__file__).resolve().parents[3]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_browser.sh"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,900", "--lang=en-US",
)  # fmt: skip
PAGE_LOAD_S = 180.0  # hang guards on a busy machine
T = TypeVar("T")


@dataclass
class Browser:
    driver: WebDriver
    artefacts: Path
    name: str

    def wait(self, condition: Callable[[WebDriver], T], what: str, timeout: float = 120.0) -> T:
        """`condition`'s first truthy value; a TimeoutException naming `what` after `timeout`."""
        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            condition, f"waited {timeout:g} s for {what}"
        )

    def screenshot(self, label: str) -> Path:
        path = self.artefacts / f"{self.name}-{label}.png"
        self.driver.save_screenshot(str(path))
        return path

    def keep_page(self, label: str) -> None:
        with contextlib.suppress(WebDriverException):
            self.screenshot(label)
            (self.artefacts / f"{self.name}-{label}.html").write_text(self.driver.page_source)


def ensure_chromium() -> None:
    """Install Debian's chromium and its driver when missing (CI does it in .ci/run first)."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, timeout=900)


@contextlib.contextmanager
def open_browser(artefacts: Path, name: str) -> Iterator[Browser]:
    ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="e2e-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(PAGE_LOAD_S)
        browser = Browser(driver, artefacts, name)
        try:
            yield browser
        finally:
            driver.quit()
