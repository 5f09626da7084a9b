"""Real Chromium (Playwright) on the model page: the pictures load, the per-class table sorts, the downloads are
the artifact files byte for byte. The model-page screenshot in the README is taken here."""

from pathlib import Path

from django.urls import reverse

from tests.test_browser import SCREENSHOT, browser, pytestmark  # noqa: F401 - the shared fixture and marks

MODEL_SCREENSHOT = SCREENSHOT.parent / "model.png"


def test_model_page_pictures_sorting_and_downloads(browser, live_server, shapes_project, admin_user, trained_version):  # noqa: F811
    project = shapes_project(4)
    version = trained_version(project)
    art = Path(version.artifact_dir)
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "admin-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    page.goto(live_server.url + reverse("training:version-list", args=[project.slug]))
    page.click(f"text=v{version.number}")
    page.wait_for_url(live_server.url + reverse("training:version-detail", args=[project.slug, version.number]))

    for selector in ("img.confusion", "img.reliability", "img.curves"):
        page.wait_for_function(f"document.querySelector('{selector}').complete")
        assert page.eval_on_selector(selector, "img => img.naturalWidth") > 0, selector

    def column(n):
        return page.eval_on_selector_all(
            "table.per-class tbody tr", f"rows => rows.map(r => r.cells[{n}].textContent.trim())"
        )

    names = column(0)
    assert len(names) > 1 and names != sorted(names)  # the engine's class order, not alphabetical
    page.click("table.per-class th:has-text('class')")
    assert column(0) == sorted(names, key=str.lower)
    page.click("table.per-class th:has-text('class')")  # again: reversed
    assert column(0) == sorted(names, key=str.lower, reverse=True)
    assert page.get_attribute("table.per-class th:has-text('class')", "aria-sort") == "descending"

    for name in ("model.onnx", "label_maps.json"):
        with page.expect_download() as info:
            page.click(f"#downloads a:has-text('{name}')")
        assert Path(info.value.path()).read_bytes() == (art / name).read_bytes(), name

    MODEL_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(MODEL_SCREENSHOT), full_page=True)
