"""The registry web page in headless Chromium (Debian's chromium + chromium-driver, via Selenium),
against a real ``ato registry serve`` holding 55 capsules: two built and published with the ato CLI
(one signed, with ``[metadata]`` and a Markdown README; one unsigned) and 53 uploaded over HTTP.

Covers: the total and paging past 50, signature status and signer fingerprint, "unsigned" with
``--allow-unsigned`` in its install command, copy buttons (read back from the clipboard), the README
rendered from Markdown and sanitised, relative times with the exact time on hover, a 390-px phone
viewport with no horizontal overflow, the confirmation before saving the ``dangerous`` permission
mode, and yank/delete for the token holder. Screenshots are saved under the test's temp dir
(``*.png``); ``ato search --json`` is checked against the same registry.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import blake3
import httpx
import pytest

from tests.conftest import _run, assert_schema
from tests.e2e.browser_support import chrome, require_chromium
from tests.e2e.registry_support import TOKEN, Registry, forge_capsule, make_project

require_chromium()

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

BULK = 53
README = """\
# Signed App

A capsule that renders `inline code`, **bold** text and [a link](https://example.org/docs).

## Usage

```sh
ato run ada/signed-app --registry http://127.0.0.1
```

| flag | meaning |
| ---- | ------- |
| `--yes` | approve |

- one
- two

<script>window.__pwned = true</script>
<img src="x.png" onerror="window.__pwned = true">
"""

METADATA = """
author = "{author}"
tags = ["demo", "signed", "web"]
homepage = "https://example.org/signed-app"
repository = "https://github.com/ada/signed-app"
"""


class Site:
    """What the module fixture published, for the tests to check the page against."""

    def __init__(self, registry: Registry, fingerprint: str, key_id: str, root: Path, env: dict[str, str]) -> None:
        self.registry = registry
        self.url = registry.url
        self.fingerprint = fingerprint
        self.key_id = key_id
        self.root = root
        self.env = env

    def api(self, path: str) -> dict:
        return httpx.get(self.url + path, timeout=30).json()

    def put(self, path: Path, publisher: str, slug: str, version: str) -> None:
        data = path.read_bytes()
        r = httpx.put(f"{self.url}/v1/local/capsules/{publisher}/{slug}/{version}", content=data, timeout=60,
                      headers={"authorization": f"Bearer {TOKEN}",
                               "x-ato-sha256": hashlib.sha256(data).hexdigest(),
                               "x-ato-blake3": blake3.blake3(data).hexdigest()})
        assert r.status_code == 201, r.text


def cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> dict:
    res = _run("ato", list(args), cwd, env, None, 180)
    assert res.code == 0, res.stderr
    return res.json()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("web-catalog")
    home = root / "home"
    env = {"HOME": str(home), "ATO_HOME": str(home / ".ato"), "XDG_DATA_HOME": str(home / ".local" / "share"),
           "ATO_TOKEN": TOKEN}
    reg = Registry(root / "data", token=TOKEN, home=home)
    try:
        key = cli(env, "key", "gen", "--out", str(root / "signer.json"), "--json")
        for version in ("1.0.0", "1.1.0"):
            proj = make_project(root / f"signed-app-{version}", "signed-app", version,
                                description="A signed capsule with a README",
                                metadata=METADATA.format(author="Ada Lovelace"), files={"README.md": README.encode()})
            built = cli(env, "build", str(proj), "--key", str(root / "signer.json"), "--json")
            assert built["signed"] is True
            cli(env, "publish", "--artifact", built["artifact"], "--registry", reg.url, "--json")
        plain = make_project(root / "plain-app", "plain-app", "0.1.0", description="Nobody signed this one",
                             metadata=METADATA.format(author="Bob"))
        built = cli(env, "build", str(plain), "--json")
        assert built["signed"] is False
        cli(env, "publish", "--artifact", built["artifact"], "--registry", reg.url, "--json")
        s = Site(reg, key["fingerprint"], key["key_id"], root, env)
        for i in range(BULK):
            name = f"bulk-{i:02d}"
            s.put(forge_capsule(root / f"{name}.capsule", name, "0.1.0",
                                members=[("main.py", f"print({i})\n".encode())]), "local", name, "0.1.0")
        yield s
    finally:
        reg.stop()


@pytest.fixture
def browser(tmp_path: Path):
    yield from chrome(tmp_path / "chrome-profile")


def wait(driver, seconds: float = 30) -> WebDriverWait:
    """Polls until true; the page re-renders after every change, so an element found a moment ago may
    be gone by the time it is read: that is "not yet", not a failure."""
    return WebDriverWait(driver, seconds, ignored_exceptions=(NoSuchElementException,
                                                              StaleElementReferenceException))


def screenshot(driver, path: Path, full_page: bool = True) -> None:
    """A PNG of the whole page (not only the viewport), for a person to look at."""
    if full_page:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
    else:
        driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000


def open_detail(driver, site: Site, scoped: str) -> None:
    driver.get(f"{site.url}/#/capsule/{scoped}")
    wait(driver).until(lambda d: d.find_element(By.ID, "detail").get_attribute("data-scoped-id") == scoped)


def use_token(driver, value: str = TOKEN) -> None:
    driver.find_element(By.ID, "token").send_keys(value)
    driver.find_element(By.ID, "token-save").click()


def test_catalog_shows_the_total_and_pages_past_fifty(site: Site, browser, tmp_path: Path) -> None:
    total = site.api("/v1/capsules")["total"]
    assert total == BULK + 2
    browser.get(site.url + "/")
    # app.js renders #catalog once its first fetch answers: wait for it (WebDriverWait ignores NoSuchElement)
    catalog = wait(browser).until(lambda d: d.find_element(By.ID, "catalog"))
    wait(browser).until(lambda d: catalog.get_attribute("data-count") == "24")
    assert browser.find_element(By.ID, "catalog-total").get_attribute("data-total") == str(total)
    assert browser.find_element(By.ID, "catalog-total").text == f"{total} capsules in this registry"
    assert browser.find_element(By.ID, "page-prev").get_property("disabled") is True
    screenshot(browser, tmp_path / "catalog.png")
    seen: list[str] = []
    page = 1
    while True:
        ids = [e.get_attribute("data-scoped-id") for e in browser.find_elements(By.CSS_SELECTOR, ".capsule-link")]
        seen += ids
        info = browser.find_element(By.ID, "page-info").text
        assert info == f"{len(seen) - len(ids) + 1}\u2013{len(seen)} of {total}"
        nxt = browser.find_element(By.ID, "page-next")
        if nxt.get_property("disabled"):
            break
        nxt.click()
        page += 1
        wait(browser).until(lambda d, p=page: catalog.get_attribute("data-page") == str(p))
    assert page == 3 and len(seen) == total == len(set(seen))  # pages 1-24, 25-48, 49-55: past 50
    screenshot(browser, tmp_path / "catalog-last-page.png")
    browser.find_element(By.ID, "page-prev").click()
    wait(browser).until(lambda d: catalog.get_attribute("data-page") == "2")

    # search narrows the total; the cards carry signature status, tags and a relative time
    search = browser.find_element(By.ID, "search")
    search.send_keys("app")
    wait(browser).until(lambda d: catalog.get_attribute("data-query") == "app" and
                        catalog.get_attribute("data-count") == "2")
    assert browser.find_element(By.ID, "catalog-total").text == "2 capsules match \u201capp\u201d"
    assert browser.find_element(By.ID, "page-next").is_displayed() is False  # one page: no pager
    signed = browser.find_element(By.CSS_SELECTOR, '.capsule-link[data-scoped-id="ada/signed-app"]')
    assert signed.find_element(By.CSS_SELECTOR, ".badge").get_attribute("data-status") == "verified"
    assert site.fingerprint in signed.find_element(By.CSS_SELECTOR, ".badge").get_attribute("title")
    assert [t.text for t in signed.find_elements(By.CSS_SELECTOR, ".tag")] == ["demo", "signed", "web"]
    plain = browser.find_element(By.CSS_SELECTOR, '.capsule-link[data-scoped-id="ada/plain-app"]')
    assert plain.find_element(By.CSS_SELECTOR, ".badge").text == "Unsigned"
    when = signed.find_element(By.CSS_SELECTOR, "time.rel-time")
    assert when.text in ("just now",) or when.text.endswith("ago")
    assert str(__import__("datetime").date.today().year) in when.get_attribute("title")
    # the relative formatter itself, on times that are not "just now"
    rel = browser.execute_script("return [relativeTime(new Date(Date.now() - 3 * 3600e3)),"
                                 " relativeTime(new Date(Date.now() - 2 * 86400e3)),"
                                 " relativeTime(new Date(Date.now() - 400 * 86400e3))]")
    assert rel == ["3 hours ago", "2 days ago", "last year"]
    screenshot(browser, tmp_path / "catalog-search.png")


def test_search_cli_reports_the_true_total_and_pages_with_the_cursor(site: Site) -> None:
    first = _run("ato", ["search", "--registry", site.url, "--limit", "50", "--json"], None, site.env, None, 60)
    assert first.code == 0, first.stderr
    doc = first.json()
    assert_schema(doc, "search")
    assert doc["total"] == BULK + 2 and len(doc["capsules"]) == 50 and doc["next_cursor"]
    rest = _run("ato", ["search", "--registry", site.url, "--limit", "50", "--cursor", doc["next_cursor"], "--json"],
                None, site.env, None, 60).json()
    assert_schema(rest, "search")
    assert rest["total"] == BULK + 2 and len(rest["capsules"]) == 5 and rest["next_cursor"] is None
    ids = [c["scoped_id"] for c in doc["capsules"] + rest["capsules"]]
    assert len(set(ids)) == BULK + 2
    row = next(c for c in doc["capsules"] + rest["capsules"] if c["scoped_id"] == "ada/signed-app")
    assert row["latest_version"] == row["latestVersion"] == "1.1.0" and row["signature_status"] == "verified"
    assert row["author"] == "Ada Lovelace" and row["tags"] == ["demo", "signed", "web"]
    human = _run("ato", ["search", "--registry", site.url], None, site.env, None, 60)
    assert f"Found {BULK + 2} package(s); showing 20:" in human.stdout
    assert "--cursor" in human.stdout
    plain = _run("ato", ["search", "plain", "--registry", site.url], None, site.env, None, 60).stdout
    assert f"ato install ada/plain-app --registry {site.url} --allow-unsigned" in plain


def clipboard(driver) -> str:
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "navigator.clipboard.readText().then(done, (e) => done('ERROR ' + e));")


def test_detail_signature_readme_metadata_and_copy_buttons(site: Site, browser, tmp_path: Path) -> None:
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": site.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    open_detail(browser, site, "ada/signed-app")
    badge = browser.find_element(By.CSS_SELECTOR, "#detail-signature .badge")
    assert badge.get_attribute("data-status") == "verified"
    short = site.api("/v1/capsules/by/ada/signed-app")["releases"][0]["signer"]["short_fingerprint"]
    assert short in badge.text and site.fingerprint in badge.get_attribute("title")
    assert browser.find_element(By.ID, "signer-fingerprint").text == site.fingerprint
    assert site.key_id in browser.find_element(By.ID, "latest-signature").text
    # [metadata]: author, tags, links
    assert browser.find_element(By.ID, "detail-author").text == "by Ada Lovelace"
    assert [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#detail-tags .tag")] == ["demo", "signed", "web"]
    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#detail-links a")}
    assert links == {"homepage": "https://example.org/signed-app", "repository": "https://github.com/ada/signed-app"}
    # README: Markdown rendered (no literal backticks), HTML sanitised
    readme = browser.find_element(By.ID, "readme")
    assert readme.find_element(By.CSS_SELECTOR, "h1").text == "Signed App"
    assert [c.text for c in readme.find_elements(By.CSS_SELECTOR, "p code")] == ["inline code"]
    assert readme.find_element(By.CSS_SELECTOR, "strong").text == "bold"
    assert "ato run ada/signed-app" in readme.find_element(By.CSS_SELECTOR, "pre code").text
    assert [td.text for td in readme.find_elements(By.CSS_SELECTOR, "table td")] == ["--yes", "approve"]
    assert len(readme.find_elements(By.CSS_SELECTOR, "li")) == 2
    assert "`" not in readme.text and "```" not in readme.text
    assert readme.find_elements(By.TAG_NAME, "script") == []
    assert readme.find_element(By.TAG_NAME, "img").get_attribute("onerror") is None
    assert browser.execute_script("return window.__pwned === undefined") is True
    assert readme.find_element(By.LINK_TEXT, "a link").get_attribute("rel") == "noopener noreferrer"

    # the install command, copied; then one version's command, copied
    cmd = f"ato install ada/signed-app --registry {site.url}"
    assert browser.find_element(By.CSS_SELECTOR, "#install-cmd code").text == cmd
    copy = browser.find_element(By.ID, "copy-install")
    copy.click()
    wait(browser).until(lambda d: copy.text == "Copied")
    assert clipboard(browser) == cmd
    rows = browser.find_elements(By.CSS_SELECTOR, "#versions tbody tr")
    assert [r.get_attribute("data-version") for r in rows] == ["1.1.0", "1.0.0"]
    one = browser.find_element(By.CSS_SELECTOR, '.version-copy[data-version="1.0.0"]')
    one.click()
    wait(browser).until(lambda d: one.text == "Copied")
    assert clipboard(browser) == f"ato install ada/signed-app@1.0.0 --registry {site.url}"
    assert browser.find_element(By.CSS_SELECTOR, '#versions tr[data-version="1.1.0"] .tag.latest')
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, tmp_path / "detail-signed.png")

    # unsigned: said so, and its install commands carry --allow-unsigned
    open_detail(browser, site, "ada/plain-app")
    assert browser.find_element(By.CSS_SELECTOR, "#detail-signature .badge").text == "Unsigned"
    assert browser.find_element(By.ID, "latest-signature").text == "Unsigned"
    unsigned_cmd = f"ato install ada/plain-app --registry {site.url} --allow-unsigned"
    assert browser.find_element(By.CSS_SELECTOR, "#install-cmd code").text == unsigned_cmd
    assert browser.find_element(By.CSS_SELECTOR, ".version-copy").get_attribute("data-copy") == \
        f"ato install ada/plain-app@0.1.0 --registry {site.url} --allow-unsigned"
    browser.find_element(By.ID, "copy-install").click()
    wait(browser).until(lambda d: clipboard(d) == unsigned_cmd)
    screenshot(browser, tmp_path / "detail-unsigned.png")


OVERFLOW_JS = """
const vw = document.documentElement.clientWidth;
const out = [];
for (const e of document.querySelectorAll('body *')) {
  if (e.closest('pre, .readme table, dialog:not([open])') || e.offsetParent === null) continue;
  const r = e.getBoundingClientRect();
  if (r.width && (r.right > vw + 0.5 || r.left < -0.5)) out.push(e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(r.right));
}
return {vw, scroll: document.documentElement.scrollWidth, out: out.slice(0, 10)};
"""


def test_a_390_px_phone_screen_has_no_horizontal_overflow(site: Site, browser, tmp_path: Path) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    browser.get(site.url + "/")
    wait(browser).until(lambda d: d.find_element(By.ID, "catalog").get_attribute("data-count") == "24")
    use_token(browser)  # the token holder's view has the most in it (Manage column)
    for name, go in (("phone-catalog", lambda: None),
                     ("phone-detail-signed", lambda: open_detail(browser, site, "ada/signed-app")),
                     ("phone-detail-unsigned", lambda: open_detail(browser, site, "ada/plain-app"))):
        go()
        found = browser.execute_script(OVERFLOW_JS)
        assert found["vw"] == 390, found
        assert found["scroll"] <= 390 and found["out"] == [], found
        if name != "phone-catalog":
            table = browser.execute_script("const r = document.getElementById('versions').getBoundingClientRect();"
                                           " return [r.left, r.right];")
            assert table[0] >= 0 and table[1] <= 390, table
            assert browser.find_element(By.CSS_SELECTOR, "#versions .yank").is_displayed()
        screenshot(browser, tmp_path / f"{name}.png")


def test_dangerous_permission_mode_needs_a_confirmation(site: Site, browser, tmp_path: Path) -> None:
    config = "/v1/local/capsules/by/local/bulk-00/runtime-config"
    open_detail(browser, site, "local/bulk-00")
    use_token(browser)
    Select(browser.find_element(By.ID, "rc-permission")).select_by_value("dangerous")
    assert browser.find_element(By.ID, "rc-dangerous-note").is_displayed()
    browser.find_element(By.ID, "rc-save").click()
    dialog = wait(browser).until(EC.visibility_of_element_located((By.ID, "confirm-dialog")))
    assert "without the sandbox" in dialog.text and "default" in dialog.text
    screenshot(browser, tmp_path / "dangerous-confirm.png", full_page=False)
    browser.find_element(By.ID, "confirm-cancel").click()
    wait(browser).until(EC.text_to_be_present_in_element((By.ID, "config-status"), "Not saved"))
    assert site.api(config) == {"targets": {}}  # cancelled: nothing stored

    browser.find_element(By.ID, "rc-save").click()
    wait(browser).until(EC.element_to_be_clickable((By.ID, "confirm-ok"))).click()
    wait(browser).until(EC.text_to_be_present_in_element((By.ID, "config-status"), "Saved"))
    assert site.api(config) == {"selected_target": "default", "targets": {"default": {"permission_mode": "dangerous"}}}
    # already dangerous: saving again (a port change) asks nothing more
    browser.find_element(By.ID, "rc-port").send_keys("9090")
    browser.find_element(By.ID, "rc-save").click()
    wait(browser).until(lambda d: site.api(config)["targets"]["default"].get("port") == 9090)
    assert browser.find_elements(By.ID, "confirm-dialog") == []
    # sandbox never asks
    Select(browser.find_element(By.ID, "rc-permission")).select_by_value("sandbox")
    browser.find_element(By.ID, "rc-save").click()
    wait(browser).until(lambda d: site.api(config)["targets"]["default"]["permission_mode"] == "sandbox")


def test_the_token_holder_yanks_restores_and_deletes(site: Site, browser, tmp_path: Path) -> None:
    for version in ("1.0.0", "2.0.0"):
        site.put(forge_capsule(tmp_path / f"doomed-{version}.capsule", "doomed-app", version,
                               members=[("main.py", b"print(1)\n")]), "local", "doomed-app", version)
    open_detail(browser, site, "local/doomed-app")
    # without the token the page shows no write actions
    assert not browser.find_element(By.CSS_SELECTOR, '.yank[data-version="2.0.0"]').is_displayed()
    assert not browser.find_element(By.ID, "delete-capsule").is_displayed()
    use_token(browser)
    browser.find_element(By.CSS_SELECTOR, '.yank[data-version="2.0.0"]').click()
    dialog = wait(browser).until(EC.visibility_of_element_located((By.ID, "confirm-dialog")))
    assert "stays downloadable by its exact version" in dialog.text
    screenshot(browser, tmp_path / "yank-confirm.png", full_page=False)
    browser.find_element(By.ID, "confirm-ok").click()
    wait(browser).until(lambda d: "yanked" in d.find_element(
        By.CSS_SELECTOR, '#versions tr[data-version="2.0.0"]').get_attribute("class"))
    detail = site.api("/v1/capsules/by/local/doomed-app")
    assert detail["latest_version"] == "1.0.0"
    assert browser.find_element(By.CSS_SELECTOR, "#install-cmd code").text == \
        f"ato install local/doomed-app --registry {site.url} --allow-unsigned"
    screenshot(browser, tmp_path / "yanked.png")
    browser.find_element(By.CSS_SELECTOR, '.yank[data-version="2.0.0"]').click()  # now "Restore"
    wait(browser).until(EC.element_to_be_clickable((By.ID, "confirm-ok"))).click()
    wait(browser).until(lambda d: site.api("/v1/capsules/by/local/doomed-app")["latest_version"] == "2.0.0")
    wait(browser).until(lambda d: "yanked" not in d.find_element(  # the page has re-rendered
        By.CSS_SELECTOR, '#versions tr[data-version="2.0.0"]').get_attribute("class"))

    # delete one version, then the capsule
    wait(browser).until(EC.element_to_be_clickable((By.CSS_SELECTOR, '.delete-version[data-version="1.0.0"]'))).click()
    wait(browser).until(EC.element_to_be_clickable((By.ID, "confirm-ok"))).click()
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, '#versions tr[data-version="1.0.0"]') == [])
    assert [r["version"] for r in site.api("/v1/capsules/by/local/doomed-app")["releases"]] == ["2.0.0"]
    wait(browser).until(EC.element_to_be_clickable((By.ID, "delete-capsule"))).click()
    wait(browser).until(EC.element_to_be_clickable((By.ID, "confirm-ok"))).click()
    wait(browser).until(lambda d: d.find_elements(By.ID, "catalog"))
    assert httpx.get(site.url + "/v1/capsules/by/local/doomed-app", timeout=10).status_code == 404
    assert json.loads(httpx.get(site.url + "/v1/capsules?q=doomed", timeout=10).text)["total"] == 0
