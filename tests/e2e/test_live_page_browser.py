"""The status page in a real browser: Debian's headless Chromium driven by Selenium (nothing downloaded).

The page shows the equipment, follows a status change and an alert without a reload, and reconnects by
itself after the daemon restarts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from peers import GUARD_S, Broker, Daemon, free_port, require_tool, script_line, scripted_equipment, write_config


@pytest.fixture
def browser() -> Iterator[Any]:
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    options = Options()
    # Debian's chromium and chromium-driver (scripts/test.sh installs them); under CI=true a missing one fails.
    options.binary_location = require_tool("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=require_tool("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, predicate: Any, what: str) -> Any:
    return WebDriverWait(driver, GUARD_S).until(lambda d: predicate(d), message=f"timed out waiting for {what}")


def texts(driver: Any, selector: str) -> list[str]:
    """The text of every element `selector` finds, read in one go (the page redraws its tables often)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent);", selector
    )


def status_of(driver: Any, eid: str) -> str | None:
    found = texts(driver, f'#equipment tr[data-eid="{eid}"] td.status')
    return found[0] if found else None


def alert_rows(driver: Any, eid: str) -> list[str]:
    return texts(driver, f'#alerts tbody tr[data-eid="{eid}"]')


def test_page_follows_the_equipment_live_and_reconnects(tmp_path: Path, broker: Broker, browser: Any) -> None:
    port = free_port()
    press, lathe = tmp_path / "press.jsonl", tmp_path / "lathe.jsonl"
    body = scripted_equipment("press-1", press) + scripted_equipment("lathe-1", lathe)
    cfg = write_config(tmp_path, broker.port, body, http=f'[http]\nlisten = "127.0.0.1:{port}"\n')
    daemon = Daemon(cfg).start()
    try:
        daemon.wait_log("http_listening")
        script_line(press, tag="state", value=0)
        browser.get(f"http://127.0.0.1:{port}/")
        wait(browser, lambda d: status_of(d, "press-1") == "idle" and status_of(d, "lathe-1"), "both equipment shown")
        browser.execute_script("window.notReloaded = true;")  # gone if the page were loaded again

        # a status change on the simulator appears without a reload
        script_line(press, tag="job", value="JOB-42")
        script_line(press, tag="state", value=1)
        wait(browser, lambda d: status_of(d, "press-1") == "running", "running shown")
        assert "JOB-42" in texts(browser, '#equipment tr[data-eid="press-1"]')[0]

        # an alert appears and clears
        script_line(press, tag="temp", value=91.5)
        wait(browser, lambda d: alert_rows(d, "press-1"), "the alert shown")
        assert "Spindle overheating" in alert_rows(browser, "press-1")[0]
        assert "91.5" in alert_rows(browser, "press-1")[0]
        script_line(press, tag="temp", value=20.0)
        wait(browser, lambda d: not alert_rows(d, "press-1"), "the alert cleared")

        # the daemon restarts: the page notices, reconnects by itself and follows again
        assert daemon.stop() == 0
        wait(browser, lambda d: texts(d, "#conn") != ["live"], "the page noticing the stop")
        daemon = Daemon(cfg).start()
        daemon.wait_log("http_listening")
        wait(browser, lambda d: texts(d, "#conn") == ["live"], "the page reconnected")
        script_line(press, tag="state", value=2)
        wait(browser, lambda d: status_of(d, "press-1") == "paused", "a change after the restart shown")
        assert browser.execute_script("return window.notReloaded === true;")
        links = texts(browser, "#links")[0]
        assert "broker" in links and "lathe-1" in links
    finally:
        daemon.stop()


def test_page_asks_for_a_key_when_keys_are_configured(tmp_path: Path, broker: Broker, browser: Any) -> None:
    port = free_port()
    press = tmp_path / "press.jsonl"
    keys = '[[http.api_keys]]\nname = "screen"\nkey_env = "EA_VIEW"\nrole = "viewer"\n'
    cfg = write_config(
        tmp_path, broker.port, scripted_equipment("press-1", press), http=f'[http]\nlisten = "127.0.0.1:{port}"\n{keys}'
    )
    daemon = Daemon(cfg, env={"EA_VIEW": "view-key-123"}).start()
    try:
        daemon.wait_log("http_listening")
        script_line(press, tag="state", value=0)
        browser.get(f"http://127.0.0.1:{port}/")
        # no data without a key: the page shows the server's reason and asks for one
        wait(browser, lambda d: d.execute_script("return !document.getElementById('login').hidden;"), "the key form")
        assert texts(browser, "#login-error") == ["unknown API key"]
        assert status_of(browser, "press-1") is None
        browser.execute_script("document.getElementById('key').value = arguments[0];", "view-key-123")
        browser.execute_script("document.getElementById('login').requestSubmit();")
        wait(browser, lambda d: status_of(d, "press-1") == "idle", "the equipment after the key")
    finally:
        daemon.stop()
