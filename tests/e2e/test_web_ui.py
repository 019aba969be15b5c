"""The registry web UI in headless Chromium (Debian's chromium + chromium-driver, via Selenium).

Loads the catalog, searches, opens a detail page, saves an env/port override
through the runtime-config route (with the write token typed into the UI) and
sees it persisted after a reload and through the API.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.browser_support import chrome, require_chromium
from tests.e2e.registry_support import TOKEN, Registry, build_in_process, make_project

require_chromium()

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture
def registry(tmp_path: Path, ato):
    reg = Registry(tmp_path / "data", token=TOKEN)
    for name, desc in (("web-alpha", "first web capsule"), ("web-beta", "second one"), ("tool-gamma", "a tool")):
        artifact = build_in_process(make_project(tmp_path / name, name, "1.2.0", description=desc))
        res = ato(["publish", "--artifact", str(artifact), "--registry", reg.url], env={"ATO_TOKEN": TOKEN})
        assert res.code == 0, res.stderr
    yield reg
    reg.stop()


@pytest.fixture
def browser(tmp_path: Path):
    yield from chrome(tmp_path / "chrome-profile")


def test_catalog_search_detail_and_runtime_config(registry: Registry, browser, tmp_path: Path) -> None:
    wait = WebDriverWait(browser, 15)
    browser.get(registry.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "catalog").get_attribute("data-count") == "3")
    names = sorted(e.get_attribute("data-scoped-id") for e in browser.find_elements(By.CSS_SELECTOR, ".capsule-link"))
    assert names == ["local/tool-gamma", "local/web-alpha", "local/web-beta"]
    assert "writes need a token" in browser.find_element(By.ID, "auth-state").text

    search = browser.find_element(By.ID, "search")
    search.send_keys("web")
    wait.until(lambda d: d.find_element(By.ID, "catalog").get_attribute("data-query") == "web"
               and d.find_element(By.ID, "catalog").get_attribute("data-count") == "2")
    search.clear()
    search.send_keys("no-such-capsule")
    wait.until(EC.presence_of_element_located((By.ID, "no-results")))
    search.clear()
    search.send_keys("alpha")
    link = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, '.capsule-link[data-scoped-id="local/web-alpha"]')))
    link.click()

    wait.until(EC.text_to_be_present_in_element((By.ID, "detail-name"), "web-alpha"))
    detail = httpx.get(registry.url + "/v1/capsules/by/local/web-alpha", timeout=10).json()
    assert browser.find_element(By.ID, "latest-blake3").text == detail["releases"][0]["blake3"]
    assert browser.find_element(By.CSS_SELECTOR, '#versions tr[data-version="1.2.0"]')
    assert 'name = "web-alpha"' in browser.find_element(By.ID, "manifest").get_attribute("textContent")  # collapsed
    assert "The web-alpha capsule." in browser.find_element(By.ID, "readme").text
    browser.save_screenshot(str(tmp_path / "detail.png"))

    # without the token the save is refused in the UI (and nothing is stored)
    Select(browser.find_element(By.ID, "rc-target")).select_by_value("default")
    browser.find_element(By.ID, "rc-port").send_keys("9191")
    browser.find_element(By.ID, "rc-add-env").click()
    browser.find_element(By.CSS_SELECTOR, "#rc-env .env-row:last-child .env-key").send_keys("GREETING")
    browser.find_element(By.CSS_SELECTOR, "#rc-env .env-row:last-child .env-value").send_keys("hello world")
    Select(browser.find_element(By.ID, "rc-permission")).select_by_value("sandbox")
    browser.find_element(By.ID, "rc-save").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "config-status"), "write token"))
    assert httpx.get(registry.url + "/v1/local/capsules/by/local/web-alpha/runtime-config",
                     timeout=10).json() == {"targets": {}}

    # a wrong token is rejected by the server
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "token-save").click()
    browser.find_element(By.ID, "rc-save").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "config-status"), "Token rejected"))

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "token-save").click()
    browser.find_element(By.ID, "rc-save").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "config-status"), "Saved"))

    stored = httpx.get(registry.url + "/v1/local/capsules/by/local/web-alpha/runtime-config", timeout=10).json()
    assert stored == {"selected_target": "default", "targets": {"default": {
        "port": 9191, "env": {"GREETING": "hello world"}, "permission_mode": "sandbox"}}}

    # persisted: a fresh load of the detail page shows the saved override
    browser.get(registry.url + "/#/capsule/local/web-alpha")
    browser.refresh()
    wait.until(EC.text_to_be_present_in_element((By.ID, "detail-name"), "web-alpha"))
    wait.until(lambda d: d.find_element(By.ID, "rc-port").get_attribute("value") == "9191")
    assert browser.find_element(By.CSS_SELECTOR, "#rc-env .env-key").get_attribute("value") == "GREETING"
    assert browser.find_element(By.CSS_SELECTOR, "#rc-env .env-value").get_attribute("value") == "hello world"
    assert Select(browser.find_element(By.ID, "rc-permission")).first_selected_option.get_attribute("value") == \
        "sandbox"
    assert httpx.get(registry.url + "/v1/capsules/by/local/web-alpha", timeout=10).json()["runtime_config"] == stored
