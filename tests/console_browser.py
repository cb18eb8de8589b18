"""A real headless browser for the console's tests: Debian's Chromium driven by Selenium
through Debian's chromedriver (never a downloaded browser or driver: Selenium Manager
is kept offline and the driver's path is given).

    with Browser.start(tmp) as browser:
        browser.open(url)
        browser.fill(user="alice", password="...")
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--ignore-certificate-errors", "--window-size=1280,1000",
         "--force-device-scale-factor=1")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "console"


def available() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return "install Debian's chromium and chromium-driver (.ci/system-packages)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "install the dev extras (selenium)"
    return None


class Browser:
    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver = driver
        self.shots = shots

    @classmethod
    @contextmanager
    def start(cls, tmp: Path) -> Iterator[Browser]:
        # Selenium Manager would fetch a driver or a browser: it must never run.
        os.environ["SE_OFFLINE"] = "true"
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={tmp / 'chromium'}"):
            options.add_argument(flag)
        service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(30)
        try:
            yield cls(driver, tmp / "screenshots")
        finally:
            driver.quit()

    # --- reading --------------------------------------------------------------------

    def open(self, url: str) -> None:
        self.driver.get(url)

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    @property
    def source(self) -> str:
        return str(self.driver.page_source)

    @property
    def text(self) -> str:
        return str(self.driver.find_element("tag name", "body").text)

    @property
    def title(self) -> str:
        return str(self.driver.title)

    def buttons(self) -> list[str]:
        return [b.text for b in self.driver.find_elements("css selector", "button")]

    def cookie(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.driver.get_cookie(name)
        return found

    # --- acting ---------------------------------------------------------------------

    def fill(self, **fields: str) -> None:
        for name, value in fields.items():
            box = self.driver.find_element("name", name)
            box.clear()
            box.send_keys(value)

    def _navigates(self, act: Any) -> None:
        """Run ``act`` (a click, a submit) and wait for the next page to be loaded."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        old = self.driver.find_element("tag name", "html")
        act()
        wait = WebDriverWait(self.driver, 20)
        wait.until(expected_conditions.staleness_of(old))
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")

    def press(self, label: str, within: str = "body") -> None:
        """Click the first button labelled ``label`` (inside the CSS selector ``within``).
        Looked up again if the page was swapped under the lookup (Chromium's "node does
        not belong to the document": a load still settling when the test went on)."""
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

        for attempt in range(3):
            try:
                scope = self.driver.find_element("css selector", within)
                button = next((b for b in scope.find_elements("css selector", "button")
                               if b.text == label), None)
                if button is None:
                    raise AssertionError(f"no button {label!r} in {within}: {self.buttons()}")
                self._navigates(button.click)
                return
            except (StaleElementReferenceException, WebDriverException) as exc:
                if attempt == 2 or not _swapped(exc):
                    raise
                time.sleep(0.2)

    def follow(self, text: str) -> None:
        self._navigates(self.driver.find_element("link text", text).click)

    def post_form(self, action: str, fields: dict[str, str]) -> None:
        """Send a form the page does not offer (what a user could craft by hand)."""
        self._navigates(lambda: self.driver.execute_script(
            "const f = document.createElement('form'); f.method = 'post';"
            "f.action = arguments[0];"
            "for (const [k, v] of Object.entries(arguments[1])) {"
            "  const i = document.createElement('input'); i.type = 'hidden'; i.name = k;"
            "  i.value = v; f.appendChild(i); }"
            "document.body.appendChild(f); f.submit();", action, fields))

    def csrf(self) -> str:
        """This page's CSRF token (every signed-in page has the sign-out form)."""
        field = self.driver.find_element("css selector", "form.who input[name=csrf]")
        return str(field.get_attribute("value"))

    def screenshot(self, name: str) -> Path:
        """The page as a PNG: in the test's temp dir, and in docs/console/ when
        DEW_TEST_SCREENSHOTS=1 (how the README's pictures are made)."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        if os.environ.get("DEW_TEST_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, SCREENSHOTS / path.name)
        return path


def _swapped(exc: Exception) -> bool:
    """The element looked up belonged to a page that was replaced meanwhile."""
    text = str(exc)
    return "stale element" in text or "does not belong to the document" in text
