"""Real Chromium (Playwright): log in, correct a label, reload, see it kept; a stale edit shows a conflict.
The labeling-page screenshot in the README is taken here."""

import os
import shutil
from pathlib import Path

import pytest

from bench.common import CHROMIUM_ARGS
from labeling import importers
from labeling.models import Image, Label
from labeling.services import project_create

CHROMIUM = os.environ.get("LOUPE_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshots" / "labeling.png"

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.browser,
    pytest.mark.skipif(
        not shutil.which(CHROMIUM), reason=f"Chromium not found at {CHROMIUM}; `make browser` installs it"
    ),
]


@pytest.fixture
def browser(monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # the ORM is used beside Playwright's event loop

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        yield browser
        browser.close()


@pytest.fixture
def project(shapes_project, reviewer):
    return shapes_project(3)


def _login(page, live_server):
    page.goto(f"{live_server.url}/")
    assert "/accounts/login/" in page.url
    page.fill("input[name=username]", "reviewer")
    page.fill("input[name=password]", "reviewer-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")


def _pick(page, head_id, text):
    page.click(f"#editor-{head_id} .picker-input")
    page.keyboard.type(text)
    page.keyboard.press("Enter")


@pytest.fixture
def lego_project(tmp_path, reviewer):
    """A small slice of the demo generator's LEGO-like photos, with two heads (part, color)."""
    from labeling.demo_data import generate_demo

    summary = generate_demo(tmp_path / "import" / "lego", seed=3, images_per_combo=1, parts=12, colors=8)
    project = project_create(name="LEGO demo", preset="lego")
    report = importers.demo_import(project=project, csv_path=summary.csv_path, images_dir=summary.out_dir / "images")
    assert report.written
    return project


def test_login_correct_label_reload_kept(browser, live_server, lego_project):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    _login(page, live_server)
    page.click("text=LEGO demo")
    page.wait_for_selector(".grid .tile img")
    part = lego_project.heads.get(name="part")
    image = Image.objects.filter(
        project=lego_project, status="ok", labels__head=part, labels__label_class__isnull=False
    ).order_by("id")[5]
    page.click(f".tile a[title='{image.original_name}']")
    page.wait_for_selector(f"#editor-{part.id} .picker-input")  # the picker replaces the select
    old = Label.objects.get(image=image, head=part).label_class
    select = page.locator(f"#class-{part.id}")
    assert select.input_value() == str(old.id)
    new = part.classes.exclude(pk=old.pk).order_by("name").first()
    _pick(page, part.id, new.name)  # the type-ahead picker: type, Enter
    page.wait_for_selector(f"#editor-{part.id} .status:has-text('Saved.')")
    page.reload()
    assert page.locator(f"#class-{part.id}").input_value() == str(new.id)
    assert f"{old.name} → {new.name}" in page.inner_text(".history")
    assert Label.objects.get(image=image, head=part).label_class == new
    page.wait_for_function("document.querySelector('.photo img').complete")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))


def test_stale_edit_shows_conflict_and_overwrites_nothing(browser, live_server, project):
    context = browser.new_context()
    first, second = context.new_page(), context.new_page()
    _login(first, live_server)
    image = Image.objects.get(original_name="B000_1.jpg")
    head = project.heads.get()
    url = f"{live_server.url}/p/{project.slug}/images/{image.id}/"
    first.goto(url)
    second.goto(url)
    green, yellow = head.classes.get(name="green"), head.classes.get(name="yellow")
    _pick(first, head.id, green.name)
    first.wait_for_selector(f"#editor-{head.id} .status:has-text('Saved.')")
    _pick(second, head.id, yellow.name)
    conflict = second.wait_for_selector(f"#editor-{head.id} .conflict")
    assert "green" in conflict.inner_text()
    assert Label.objects.get(image=image, head=head).label_class == green


HEALTH_SCREENSHOT = SCREENSHOT.parent / "health.png"


def test_admin_runs_health_scan_resolves_a_conflict_and_undoes(browser, live_server, lego_project, admin_user, worker):
    """The scan runs on a real Celery worker; the page shows live progress, then the report."""
    from labeling.models import DatasetAction, DuplicateCluster

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "admin-pass-123")
    page.click("button[type=submit]")
    page.goto(f"{live_server.url}/p/{lego_project.slug}/health/")
    page.click("#run-scan")
    page.wait_for_selector("#summary", timeout=120_000)  # htmx polled the progress, then refreshed the page
    assert "Unreadable, truncated, missing or empty files" in page.inner_text("#summary")
    files = page.inner_text("#files")
    assert "unreadable" in files or "truncated" in files
    first = page.locator(".cluster").first
    assert "Conflicting labels" in first.inner_text()
    page.screenshot(path=str(HEALTH_SCREENSHOT), full_page=False)
    cluster_id = int(first.get_attribute("id").removeprefix("cluster-"))
    first.locator("button[value=keep_one]").click()
    page.wait_for_selector(".messages li:has-text('excluded')")
    cluster = DuplicateCluster.objects.get(pk=cluster_id)
    kept, *rest = cluster.image_ids
    assert Image.objects.get(pk=kept).status == "ok"
    assert {im.status for im in Image.objects.filter(pk__in=rest)} == {"excluded"}
    page.locator("#actions button.undo").first.click()
    page.wait_for_selector(".messages li:has-text('Undone')")
    assert {im.status for im in Image.objects.filter(pk__in=rest)} == {"ok"}
    assert DatasetAction.objects.get().undone_at is not None


REVIEW_SCREENSHOT = SCREENSHOT.parent / "review.png"


def _login_as(page, live_server, username, password):
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")


@pytest.fixture
def mislabel_queue(shapes_project, trained_version):
    from review.tests.helpers import queue_mislabels

    project = shapes_project(6)
    return project, queue_mislabels(project, trained_version(project))


def test_review_mislabels_with_the_keyboard_only(browser, live_server, mislabel_queue, reviewer):
    from review.models import ReviewItem

    project, flipped = mislabel_queue
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _login_as(page, live_server, "reviewer", "reviewer-pass-123")
    page.goto(f"{live_server.url}/p/{project.slug}/review/mislabel/")
    first = int(page.get_attribute("#review-panel", "data-item"))
    page.wait_for_function(  # reference photos load after the item: four of each class
        "(() => { const im = Array.from(document.querySelectorAll('#references img'));"
        " return im.length === 8 && im.every(i => i.complete && i.naturalWidth > 0); })()"
    )
    page.wait_for_function("document.querySelector('#review-photo').complete")
    page.screenshot(path=str(REVIEW_SCREENSHOT))
    item = ReviewItem.objects.get(pk=first)
    page.keyboard.press("Enter")  # accept the suggestion
    page.wait_for_function(f"document.querySelector('#review-panel').dataset.item !== '{first}'")
    assert Label.objects.get(image_id=item.image_id).label_class.name == flipped[item.image_id]
    second = int(page.get_attribute("#review-panel", "data-item"))
    page.keyboard.press("k")  # keep the given label
    page.wait_for_function(f"document.querySelector('#review-panel').dataset.item !== '{second}'")
    assert ReviewItem.objects.get(pk=second).resolution == "kept"
    page.keyboard.press("u")  # undo: the kept item is back
    page.wait_for_function(f"document.querySelector('#review-panel').dataset.item === '{second}'")
    assert ReviewItem.objects.get(pk=second).status == "open"
    page.keyboard.press("?")
    assert page.is_visible("#shortcuts")
    page.keyboard.press("Escape")
    page.keyboard.press("/")  # type-ahead: another class by name
    item2 = ReviewItem.objects.get(pk=second)
    other = next(
        c for c in ("red", "blue", "green", "yellow") if c not in (item2.given_class.name, flipped[item2.image_id])
    )
    page.keyboard.type(other[:3])
    assert page.inner_text("#review-panel .picker-list li.active") == other  # the picker's first match
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelector('#review-panel').dataset.item !== '{second}'")
    assert ReviewItem.objects.get(pk=second).resolution == "relabeled"
    assert Label.objects.get(image_id=item2.image_id).label_class.name == other
    third = int(page.get_attribute("#review-panel", "data-item"))
    page.keyboard.press("2")  # the second of the top 5
    page.wait_for_function(f"document.querySelector('#review-panel').dataset.item !== '{third}'")
    done = ReviewItem.objects.get(pk=third)
    assert done.status == "done" and done.resolved_class_id == done.top_k[1]["class_id"]


def test_two_reviewers_on_one_queue_never_get_the_same_item(browser, live_server, mislabel_queue, admin_user, reviewer):
    project, _ = mislabel_queue
    pages = []
    for username, password in (("reviewer", "reviewer-pass-123"), ("admin", "admin-pass-123")):
        page = browser.new_context().new_page()
        _login_as(page, live_server, username, password)
        pages.append(page)
    from review.models import ReviewItem

    url = f"{live_server.url}/p/{project.slug}/review/mislabel/"
    for page in pages:
        page.goto(url)
    a, b = (int(page.get_attribute("#review-panel", "data-item")) for page in pages)
    assert a != b
    pages[0].keyboard.press("Enter")  # the first reviewer decides: the next item is still not the other's
    pages[0].wait_for_function(f"document.querySelector('#review-panel').dataset.item !== '{a}'")
    a2 = int(pages[0].get_attribute("#review-panel", "data-item"))
    assert a2 not in (a, b)
    pages[1].reload()  # the second reviewer keeps their leased item
    assert int(pages[1].get_attribute("#review-panel", "data-item")) == b
    held = ReviewItem.objects.filter(status="open", leased_by__isnull=False)
    assert sorted(held.values_list("id", flat=True)) == sorted([a2, b])


def test_picker_is_hierarchy_aware_and_admins_create_classes(browser, live_server, car_project, reviewer, admin_user):
    project = car_project(groups=2, per_group=1)  # make -> model: Toyota (Corolla, Yaris), Honda (Civic)
    make, model = project.heads.get(name="make"), project.heads.get(name="model")
    image = Image.objects.get(project=project, original_name="Corolla0_0.jpg")  # Toyota Corolla
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    _login(page, live_server)
    page.goto(f"{live_server.url}/p/{project.slug}/images/{image.id}/")
    page.click(f"#editor-{model.id} .picker-input")
    listed = page.locator(f"#editor-{model.id} .picker-list li").all_inner_texts()
    assert listed == ["Corolla", "Yaris"]  # the chosen make's models
    page.keyboard.type("civ")
    assert page.locator(f"#editor-{model.id} .picker-list li").all_inner_texts() == ["Civic (Honda)"]
    assert "create" not in page.inner_text(f"#editor-{model.id}")  # reviewers cannot add classes
    page.keyboard.press("Enter")  # choosing a model sets its make
    page.wait_for_selector(f"#editor-{model.id} .status:has-text('Saved.')")
    labels = {
        lb.head.name: lb.label_class.name
        for lb in Label.objects.filter(image=image).select_related("head", "label_class")
    }
    assert labels == {"make": "Honda", "model": "Civic"}

    admin = browser.new_context().new_page()
    admin.goto(f"{live_server.url}/accounts/login/")
    admin.fill("input[name=username]", "admin")
    admin.fill("input[name=password]", "admin-pass-123")
    admin.click("button[type=submit]")
    admin.goto(f"{live_server.url}/p/{project.slug}/images/{image.id}/")
    _pick(admin, model.id, "Accord")  # no such class: the admin's Enter asks, the second creates it under Honda
    admin.wait_for_selector(f"#editor-{model.id} .picker-list li.create.confirm:has-text('under Honda')")
    admin.keyboard.press("Enter")
    admin.wait_for_selector(f"#editor-{model.id} .status:has-text('Saved.')")
    accord = model.classes.get(name="Accord")
    assert accord.parent == make.classes.get(name="Honda")
    assert Label.objects.get(image=image, head=model).label_class == accord


def test_picker_stays_instant_with_5000_classes(browser, live_server, project):
    from labeling.models import LabelClass

    head = project.heads.get()
    LabelClass.objects.bulk_create(
        [LabelClass(head=head, name=f"sku-{i:05d}", normalized_name=f"sku-{i:05d}") for i in range(5000)]
    )
    image = Image.objects.filter(project=project).first()
    page = browser.new_page()
    _login(page, live_server)
    page.goto(f"{live_server.url}/p/{project.slug}/images/{image.id}/")
    page.click(f"#editor-{head.id} .picker-input")
    times = page.evaluate(
        """async (sel) => {
        const input = document.querySelector(sel);
        const out = [];
        for (const text of ["s", "sk", "sku-0", "sku-04", "sku-049", "sku-0499", "sku-04999"]) {
          const t = performance.now();
          input.value = text;
          input.dispatchEvent(new Event("input"));
          out.push(performance.now() - t);
        }
        return out;
      }""",
        f"#editor-{head.id} .picker-input",
    )
    assert max(times) < 50, times  # filtering 5,000 names and drawing the list, per key press
    assert page.locator(f"#editor-{head.id} .picker-list li").all_inner_texts() == ["sku-04999"]


def test_reviewer_gets_403_on_admin_actions_until_made_project_admin(browser, live_server, project, admin_user):
    """A reviewer sees no admin navigation and gets 403 on admin pages and actions; an admin makes them a
    project admin on the Members page, and the same pages open (for that project only)."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    _login(page, live_server)
    page.goto(f"{live_server.url}/p/{project.slug}/")
    nav = page.inner_text("header.top nav")
    assert "Review" in nav and "Models" not in nav and "Import" not in nav and "Members" not in nav
    for path in ("health/", "versions/", "runs/", "members/"):
        response = page.goto(f"{live_server.url}/p/{project.slug}/{path}")
        assert response.status == 403, path
        assert "Only admins" in page.inner_text("body")
    assert page.goto(f"{live_server.url}/team/").status == 403
    # an admin action posted straight from the reviewer's page (a fetch with the page's CSRF token): 403
    page.goto(f"{live_server.url}/p/{project.slug}/")
    status = page.evaluate(
        """async (url) => {
            const token = JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRFToken'];
            const r = await fetch(url, {method: 'POST', headers: {'X-CSRFToken': token}});
            return r.status;
        }""",
        f"{live_server.url}/p/{project.slug}/health/scan/",
    )
    assert status == 403

    admin = browser.new_context().new_page()
    admin.goto(f"{live_server.url}/accounts/login/")
    admin.fill("input[name=username]", "admin")
    admin.fill("input[name=password]", "admin-pass-123")
    admin.click("button[type=submit]")
    admin.goto(f"{live_server.url}/p/{project.slug}/members/")
    admin.fill("#add-member input[name=username]", "reviewer")
    admin.select_option("#add-member select[name=role]", "admin")
    admin.click("#add-member button[type=submit]")
    admin.wait_for_selector('#members tr[data-user="reviewer"]')
    assert "reviewer is now admin of" in admin.inner_text(".messages")

    page.goto(f"{live_server.url}/p/{project.slug}/")
    assert "Models" in page.inner_text("header.top nav")
    assert page.goto(f"{live_server.url}/p/{project.slug}/health/").status == 200
    assert page.goto(f"{live_server.url}/team/").status == 403  # accounts stay the site admins'


def test_label_a_low_confidence_item_with_the_keyboard(browser, live_server, shapes_project, reviewer, trained_version):
    """The low-confidence queue: an unlabeled photo ranked by the active model; the reviewer labels it with a
    digit (one of the model's top 5) and accepts the next one's suggestion with Enter."""
    from review import services as review_services
    from review.models import ReviewItem

    project = shapes_project(6)
    trained_version(project)
    images = list(Image.objects.filter(project=project).order_by("id"))
    Label.objects.filter(image_id__in=[im.id for im in images[::2]]).update(label_class=None)
    assert review_services.uncertain_refresh(project=project, size=6)["queued"] == 6
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _login(page, live_server)
    page.goto(f"{live_server.url}/p/{project.slug}/review/uncertain/")
    first = int(page.get_attribute("#review-panel", "data-item"))
    assert page.inner_text("#given") == "unlabeled" and not page.is_visible("#btn-keep")  # nothing to keep
    page.keyboard.press("3")  # the third of the model's top 5
    page.wait_for_function(f"document.querySelector('#review-panel').dataset.item !== '{first}'")
    item = ReviewItem.objects.get(pk=first)
    label = Label.objects.get(image_id=item.image_id)
    assert item.status == "done" and label.label_class_id == item.top_k[2]["class_id"]
    second = int(page.get_attribute("#review-panel", "data-item"))
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelector('#review-panel').dataset.item !== '{second}'")
    item = ReviewItem.objects.get(pk=second)
    assert item.resolution == "accepted"
    assert Label.objects.get(image_id=item.image_id).label_class_id == item.suggested_class_id


# ------------------------------------------------------------------ the browser never changes data by accident
def _admin_page(browser, live_server, **kwargs):
    page = browser.new_context(**kwargs).new_page()
    _login_as(page, live_server, "admin", "admin-pass-123")
    return page


def test_enter_on_a_focused_link_or_button_never_decides(browser, live_server, mislabel_queue, admin_user):
    """Issue 14.12: with the focus on "Bulk rules…", Enter follows the link and accepts nothing; letters on a
    focused link do nothing either; Esc gives the keys back to the page."""
    from review.models import ReviewItem

    project, _ = mislabel_queue
    page = _admin_page(browser, live_server)
    url = f"{live_server.url}/p/{project.slug}/review/mislabel/"
    page.goto(url)
    first = int(page.get_attribute("#review-panel", "data-item"))
    labels = dict(Label.objects.values_list("image_id", "label_class_id"))
    page.focus("text=Bulk rules…")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_server.url}/p/{project.slug}/review/mislabel/rules/", timeout=5000)
    assert ReviewItem.objects.get(pk=first).status == "open"
    assert dict(Label.objects.values_list("image_id", "label_class_id")) == labels
    page.goto(url)
    assert int(page.get_attribute("#review-panel", "data-item")) == first  # still leased to the admin
    page.focus("text=Reviewer statistics")
    for key in ("a", "x", "k", "1"):
        page.keyboard.press(key)
    page.wait_for_timeout(300)
    assert ReviewItem.objects.get(pk=first).status == "open" and page.url == url
    page.keyboard.press("Escape")  # off the link: the page's keys act again
    page.keyboard.press("k")
    page.wait_for_function(f"document.querySelector('#review-panel').dataset.item !== '{first}'")
    assert ReviewItem.objects.get(pk=first).resolution == "kept"
    assert dict(Label.objects.values_list("image_id", "label_class_id")) == labels


def test_picker_never_creates_a_class_from_a_typo_and_asks_once(browser, live_server, project, admin_user):
    """Issue 14.13: "arch1x4" + Enter picks the existing arch_1x4 (the create row is listed last, never the
    default), "yelow" finds yellow; a really new name asks once before it is created, and Esc cancels."""
    from labeling.models import LabelClass

    head = project.heads.get()
    arch = LabelClass.objects.create(head=head, name="arch_1x4", normalized_name="arch_1x4")
    image = Image.objects.filter(project=project).order_by("id").first()
    label = Label.objects.get(image=image, head=head)
    n_classes = LabelClass.objects.filter(head=head).count()
    page = _admin_page(browser, live_server)
    page.goto(f"{live_server.url}/p/{project.slug}/images/{image.id}/")
    rows = f"#editor-{head.id} .picker-list li"
    page.click(f"#editor-{head.id} .picker-input")
    page.keyboard.type("arch1x4")
    assert page.locator(rows).all_inner_texts() == ["arch_1x4", "+ create “arch1x4”…"]
    assert page.inner_text(f"{rows}.active") == "arch_1x4"
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#editor-{head.id} .status:has-text('Saved.')")
    assert Label.objects.get(pk=label.pk).label_class == arch
    page.click(f"#editor-{head.id} .picker-input")
    page.keyboard.type("yelow")  # one letter missing
    assert page.inner_text(f"{rows}.active") == "yellow"
    page.fill(f"#editor-{head.id} .picker-input", "")
    page.keyboard.type("brick2x2")  # matches nothing: only the create row, and Enter asks
    page.keyboard.press("Enter")
    question = page.wait_for_selector(f"{rows}.create.confirm")
    assert "Create “brick2x2” as a new class class? Enter creates it · Esc cancels" == question.inner_text()
    page.wait_for_timeout(300)
    assert LabelClass.objects.filter(head=head).count() == n_classes
    page.keyboard.press("Escape")  # cancels the question, not the typing
    assert page.locator(rows).all_inner_texts() == ["+ create “brick2x2”…"]
    page.keyboard.press("Enter")
    page.wait_for_selector(f"{rows}.create.confirm")
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#class-{head.id} option:has-text('brick2x2')[selected]", state="attached")
    assert LabelClass.objects.filter(head=head).count() == n_classes + 1
    assert Label.objects.get(pk=label.pk).label_class.name == "brick2x2"


def test_bulk_rules_name_the_count_and_apply_only_when_confirmed(browser, live_server, mislabel_queue, admin_user):
    """Issue 14.14: the first preview uses the calibrated accept threshold and no exclude rule; the button names
    the real number of items; applying asks on a page that names it again; the confirmed form posted a second
    time (back, submit) changes nothing."""
    from labeling.models import DatasetAction
    from training.models import ModelVersion

    project, flipped = mislabel_queue
    version = ModelVersion.objects.get(project=project)
    version.metrics = {
        **version.metrics,
        "calibration": {"temperature": {"class": 1.0}, "softmax_threshold": {"class": 0.5}},
    }
    version.save(update_fields=["metrics"])
    n = len(flipped)
    page = _admin_page(browser, live_server)
    page.goto(f"{live_server.url}/p/{project.slug}/review/mislabel/rules/")
    assert page.input_value("input[name=accept_above]") == "0.5" and page.input_value("input[name=exclude_below]") == ""
    assert page.inner_text("#apply") == f"Apply to these {n} items…"
    labels = dict(Label.objects.values_list("image_id", "label_class_id"))
    page.click("#apply")
    assert page.inner_text("#confirm h2") == f"Apply the rule to {n} items?"
    assert dict(Label.objects.values_list("image_id", "label_class_id")) == labels
    old_tab = page.context.new_page()  # the same confirm page left open in another tab
    old_tab.goto(page.url)
    page.click("#confirm-apply")
    page.wait_for_selector(f".messages li:has-text('accepted {n} suggestion(s) above 0.5')")
    assert all(Label.objects.get(image_id=i).label_class.name == c for i, c in flipped.items())
    old_tab.click("#confirm-apply")  # the confirmed form, posted again
    old_tab.wait_for_selector(".messages li:has-text('changed since the preview you confirmed')")
    assert DatasetAction.objects.filter(kind="review_bulk").count() == 1


def test_thresholds_and_bulk_relabel_ask_before_changing(
    browser, live_server, shapes_project, admin_user, trained_version
):
    """Issue 14.15: "Use suggested thresholds" shows the change and waits for a confirm; the change is undone
    from the Health page's action list. Bulk relabel on the grid has no default class and asks first."""
    from labeling.models import Head

    project = shapes_project(3)
    version = trained_version(project)
    suggested = round(version.suggested_thresholds["class"], 4)
    start = 0.01 if suggested != 0.01 else 0.02
    Head.objects.filter(project=project).update(threshold=start)
    page = _admin_page(browser, live_server, viewport={"width": 1400, "height": 900})
    page.goto(f"{live_server.url}/p/{project.slug}/models/")
    page.click("text=Use suggested thresholds")
    page.wait_for_selector("#threshold-plan", timeout=5000)  # a confirm page, nothing changed yet
    assert f"{start:.2f}" in page.inner_text("#threshold-plan") and Head.objects.get(project=project).threshold == start
    page.click("#confirm-thresholds")
    page.wait_for_selector(".messages li:has-text('Undo it from the Health page')")
    assert Head.objects.get(project=project).threshold == suggested
    page.goto(f"{live_server.url}/p/{project.slug}/health/")
    assert "serving thresholds from v1" in page.inner_text("#actions")
    page.locator("#actions button.undo").first.click()
    page.wait_for_selector(".messages li:has-text('Undone')")
    assert Head.objects.get(project=project).threshold == start

    head = project.heads.get()
    page.goto(f"{live_server.url}/p/{project.slug}/?head={head.id}")
    boxes = page.locator("#grid input[name=item]")
    chosen = [int(boxes.nth(i).get_attribute("value").split(":")[0]) for i in range(2)]
    before = dict(Label.objects.filter(image_id__in=chosen).values_list("image_id", "label_class_id"))
    boxes.nth(0).check()
    boxes.nth(1).check()
    assert page.input_value("select[name=label_class]") == ""  # no default target
    page.click("#bulk-apply")  # nothing chosen: the browser asks for a class, nothing is posted
    page.wait_for_timeout(300)
    assert "/images/bulk-relabel/" not in page.url
    page.select_option("select[name=label_class]", label="red")
    page.click("#bulk-apply")
    page.wait_for_selector("#confirm-relabel")
    assert "Set class of 2 images to “red”?" in page.inner_text("h1")
    assert dict(Label.objects.filter(image_id__in=chosen).values_list("image_id", "label_class_id")) == before
    page.click("#confirm-relabel")
    page.wait_for_selector(".messages li:has-text('2 image(s) -> red')")
    assert {Label.objects.get(image_id=i).label_class.name for i in chosen} == {"red"}


def test_a_promote_shows_its_index_build_job_and_the_admin_cancels_it(
    browser, live_server, shapes_project, admin_user, trained_version
):
    """Issue 16.3: the Models page names the job a promote waits for (queue, place, cancel); the Jobs page lists
    every kind; a cancel from the page withdraws the promote."""
    from training.models import Job, ModelVersion

    project = shapes_project(4)
    trained_version(project)
    second = trained_version(project)  # not promoted (LOUPE_AUTO_PROMOTE=first)
    page = _admin_page(browser, live_server)
    page.goto(f"{live_server.url}/p/{project.slug}/models/")
    page.on("dialog", lambda d: d.accept())
    page.click(f"#versions tr:has-text('v{second.number}') button:has-text('Promote')")
    page.wait_for_load_state()
    if page.locator("#confirm-promote").count():  # the gate asks when v2 scores lower on the test split
        page.click("#confirm-promote")
    build = Job.objects.get(kind="index_build", version=second)  # nobody consumes the queue in this test
    box = page.wait_for_selector(f'.job-status[data-job="job/{build.pk}"]')
    assert "waiting on the default queue" in box.inner_text() and "promoting" in page.inner_text("#versions")
    page.goto(f"{live_server.url}/p/{project.slug}/jobs/")
    row = page.locator(f'#jobs tr[data-job="job/{build.pk}"]')
    assert "Index build" in row.inner_text() and "queued" in row.inner_text()
    assert page.locator(f'#jobs tr[data-job="trainingrun/{second.run_id}"]').count() == 1
    row.locator("button:has-text('Cancel')").click()
    page.wait_for_selector(".messages")
    assert f"Index build {build.pk} cancelled" in page.inner_text(".messages")
    assert "cancelled" in page.locator(f'#jobs tr[data-job="job/{build.pk}"]').inner_text()
    second.refresh_from_db()
    assert (
        second.index_status == ModelVersion.IndexStatus.NONE and not second.promote_requested and not second.is_active
    )


# A dropped folder as the browser's FileSystem entries API gives it (DataTransferItem.webkitGetAsEntry): Playwright
# cannot make a real OS drag, and a DataTransfer built by script holds files, not folders, so the test gives the
# drop's items the entries a dropped `shapes/` folder would have (directory readers that answer in pages, as
# Chromium's do) around real File objects; the page's own code walks them.
_DROP_FOLDER = """([files, extra]) => {
    const asFile = ([path, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        return new File([bytes], path.split("/").pop(), {type: "image/jpeg"});
    };
    const fileEntry = (path, file) => ({isFile: true, isDirectory: false, name: file.name, fullPath: "/" + path,
                                        file: (ok) => setTimeout(() => ok(file))});
    const dirEntry = (name, children) => ({isFile: false, isDirectory: true, name,
        createReader: () => { let pages = [children.slice(0, 2), children.slice(2), []];
                              return {readEntries: (ok) => setTimeout(() => ok(pages.shift() || []))}; }});
    const tree = {};
    for (const [path, b64] of files) {
        const parts = path.split("/");
        (tree[parts[1]] = tree[parts[1]] || []).push(fileEntry(path, asFile([path, b64])));
    }
    const root = dirEntry("shapes", Object.entries(tree).map(([cls, kids]) => dirEntry(cls, kids)));
    const dt = new DataTransfer();
    const placeholder = new File([""], "shapes");
    dt.items.add(placeholder);
    for (const [name, text] of extra) dt.items.add(new File([text], name, {type: "text/plain"}));
    const real = DataTransferItem.prototype.webkitGetAsEntry;
    DataTransferItem.prototype.webkitGetAsEntry = function () {
        const f = this.getAsFile();
        return f && f.name === "shapes" ? root : real.call(this);
    };
    const zone = document.getElementById("drop-zone");
    zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
    zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""


def test_admin_drops_a_folder_on_the_import_page_and_the_job_imports_it(browser, live_server, admin_user, worker):
    """Issue 17.3: drag and drop on the Import page — a folder of class folders plus a stray text file —, the photos
    go up in several requests (the text file is refused and named), the import job runs on a real worker, and the
    grid shows the photos with their classes from the folder names."""
    import base64

    from conftest import make_photo
    from labeling.models import ImportRun, ImportUpload

    project = project_create(name="Drops", preset="retrieval")
    project.min_image_side = 32
    project.save(update_fields=["min_image_side"])
    files = [
        [f"shapes/{color}/{color[0].upper()}{i:03d}_0.jpg", base64.b64encode(make_photo(color, seed=i)).decode()]
        for color in ("red", "blue")
        for i in range(13)  # 26 photos: two requests of at most 20
    ]
    page = _admin_page(browser, live_server, viewport={"width": 1280, "height": 900})
    page.goto(f"{live_server.url}/p/{project.slug}/import/")
    page.check("input[name=labeling][value=folder]")
    sent = []

    def flaky_once(route):  # the first request fails (a proxy's 502): the page retries it by itself
        sent.append(route.request.url)
        route.fulfill(status=502, body="Bad gateway") if len(sent) == 1 else route.continue_()

    page.route("**/import/uploads/*/files/", flaky_once)
    page.evaluate(_DROP_FOLDER, [files, [["notes.txt", "not a photo"]]])
    page.wait_for_selector("#upload-summary:has-text('26 photo(s)')")
    assert "notes.txt — not an image file name" in page.inner_text("#upload-refused")
    page.click("#upload-go")
    page.wait_for_selector("#upload[data-import-status]", timeout=120_000)
    assert page.get_attribute("#upload", "data-import-status") == "succeeded", page.inner_text("#upload-job")
    assert "Imported 26 new image(s)" in page.inner_text("#upload-report")
    assert len(sent) == 3  # two requests of at most 20 photos, the first sent twice
    run = ImportRun.objects.get(project=project)
    assert (run.mode, run.report["created"]) == ("upload", 26) and not ImportUpload.objects.exists()
    page.click("#upload-grid-link")
    page.wait_for_selector(".grid .tile img")
    assert page.locator(".grid .tile").count() == 26
    assert {c.name for c in project.heads.get().classes.all()} == {"red", "blue"}
