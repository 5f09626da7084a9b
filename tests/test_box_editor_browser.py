"""Real Chromium (Playwright) on the box editor (issue 18.2): a keyboard-only session (create, nudge, resize, class,
next/previous, accept/reject/accept all suggestions, delete, save, undo) checked in the database to the pixel; a stale
save shows the conflict and overwrites nothing, a refused one the server's message; 200 boxes on one photo stay fast
(timings printed); the mouse draws, moves and resizes a box, and boxes stay aligned when zoomed."""

import io
import time

import pytest
from PIL import Image as PILImage

from labeling import boxes as box_service
from labeling.models import Box, BoxSet
from labeling.tests.factories import ImageFactory, ProjectFactory
from tests.test_browser import _admin_page, browser, pytestmark  # noqa: F401 - the shared fixture and marks

EDITOR = ".box-editor"
STATE = "window.loupeBoxEditors[0].state()"


def _jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (width, height), (120, 110, 100)).save(out, "JPEG", quality=80)
    return out.getvalue()


@pytest.fixture
def shelf(admin_user):
    project = ProjectFactory(name="Shelf", preset="shelf")
    head = project.heads.get(name="container")
    classes = {c.name: c for c in head.classes.all()}
    return project, head, classes


def _box(cls, x, y, w, h, source="human", score=None):
    return {"x": x, "y": y, "w": w, "h": h, "class_id": cls.id, "source": source, "score": score}


def _stored(image, head):
    box_set = BoxSet.objects.get(image=image, head=head)
    rows = box_set.boxes.select_related("label_class").order_by("order")
    return box_set.version, [(b.x, b.y, b.w, b.h, b.label_class.name, b.source, b.score) for b in rows]


def _open(page, live_server, project, image):
    page.goto(f"{live_server.url}/p/{project.slug}/images/{image.id}/")
    page.wait_for_selector(f"{EDITOR}[data-ready='1']")


def _selected(page):
    sel = page.evaluate(STATE)["selected"]
    return None if sel is None else (sel["x"], sel["y"], sel["w"], sel["h"])


def test_keyboard_only_session_is_stored_to_the_pixel(browser, live_server, shelf):  # noqa: F811
    project, head, c = shelf
    image = ImageFactory(project=project, data=_jpeg(480, 320))
    suggestions_and_one_box = [
        _box(c["bottle"], 20, 20, 40, 80, "model", 0.9),  # S1
        _box(c["can"], 100, 20, 40, 80, "model", 0.6),  # S2
        _box(c["glass"], 20, 200, 40, 80, "model", 0.7),  # S3
        _box(c["unknown_container"], 400, 20, 40, 80, "model", 0.3),  # S4
        _box(c["can"], 300, 200, 50, 60),  # H1
    ]
    box_service.box_set(image=image, head=head, boxes=suggestions_and_one_box, expected_version=0)
    page = _admin_page(browser, live_server, viewport={"width": 1280, "height": 900})
    _open(page, live_server, project, image)
    url = page.url
    # The editor has the focus on load: no mouse from here on.
    assert page.evaluate("document.activeElement.classList.contains('be-viewport')")
    assert page.locator(f"{EDITOR} .be-box.model").count() == 4  # suggestions drawn dashed, with their score
    assert "0.90 bottle" in page.text_content(f"{EDITOR} .be-svg")

    # b: a new box at the view's centre (the whole 480×320 photo fits: centre 240,160; side round(320 / 6) = 53).
    page.keyboard.press("b")
    assert _selected(page) == (214, 134, 53, 53)
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+ArrowDown")
    assert _selected(page) == (217, 144, 53, 53)
    page.keyboard.press("Alt+ArrowRight")  # Alt+arrows resize (no browser "back")
    page.keyboard.press("Alt+ArrowRight")
    page.keyboard.press("Control+ArrowDown")
    page.keyboard.press("Alt+Shift+ArrowLeft")
    assert _selected(page) == (217, 144, 45, 54) and page.url == url
    page.keyboard.press("2")  # class 2 = can
    assert page.evaluate(STATE)["selected"]["class_id"] == c["can"].id
    page.keyboard.press("Control+z")  # client-side undo of the unsaved class change
    assert page.evaluate(STATE)["selected"]["class_id"] == c["bottle"].id
    page.keyboard.press("2")

    # Reading order: S1 S2 S4 (top row), N, S3 H1.
    page.keyboard.press("n")
    assert _selected(page) == (20, 200, 40, 80)  # S3
    page.keyboard.press("p")
    page.keyboard.press("p")
    assert _selected(page) == (400, 20, 40, 80)  # S4
    page.keyboard.press("Shift+Tab")
    assert _selected(page) == (100, 20, 40, 80)  # S2
    assert "suggestion 0.60" in page.inner_text(f"{EDITOR} .be-status")

    page.keyboard.press("a")  # accept S2, go to the next suggestion: S4
    assert _selected(page) == (400, 20, 40, 80)
    page.keyboard.press("r")  # reject S4, next suggestion: S3
    assert _selected(page) == (20, 200, 40, 80)
    page.keyboard.press("Shift+A")  # accept all: S1 and S3
    assert "Accepted 2 suggestions" in page.inner_text(f"{EDITOR} .be-status")
    assert page.locator(f"{EDITOR} .be-box.model").count() == 0
    page.keyboard.press("Tab")  # S3 → H1
    assert _selected(page) == (300, 200, 50, 60)
    page.keyboard.press("Delete")
    assert _selected(page) is None
    assert page.evaluate(STATE)["dirty"]
    page.keyboard.press("s")
    page.wait_for_selector(f"{EDITOR} .be-status:has-text('Saved 4 boxes (version 2)')")

    assert _stored(image, head) == (
        2,
        [
            (20.0, 20.0, 40.0, 80.0, "bottle", "human", None),
            (100.0, 20.0, 40.0, 80.0, "can", "human", None),
            (20.0, 200.0, 40.0, 80.0, "glass", "human", None),
            (217.0, 144.0, 45.0, 54.0, "can", "human", None),
        ],
    )
    # Ctrl+Z with nothing unsaved: the server undoes the saved change (the action log's undo).
    page.keyboard.press("Control+z")
    page.wait_for_selector(f"{EDITOR} .be-status:has-text('Undid the last saved change')")
    version, rows = _stored(image, head)
    assert version == 3 and len(rows) == 5 and rows[0][5] == "model"
    assert page.evaluate(STATE)["version"] == 3 and len(page.evaluate(STATE)["boxes"]) == 5
    page.reload()  # nothing unsaved: no question; the page's history lists each change of the set
    history = page.inner_text(".history")
    assert "container: 4 → 5 boxes (version 3)" in history and "container: 5 → 4 boxes (version 2)" in history
    page.wait_for_selector(f"{EDITOR}[data-ready='1']")
    # Tab past the last box leaves the editor (no keyboard trap).
    page.keyboard.press("Escape")
    for _ in range(6):
        page.keyboard.press("Tab")
    assert not page.evaluate("document.activeElement.classList.contains('be-viewport')")


def test_stale_save_shows_the_conflict_and_overwrites_nothing(browser, live_server, shelf):  # noqa: F811
    project, head, c = shelf
    image = ImageFactory(project=project, data=_jpeg(480, 320))
    box_service.box_set(image=image, head=head, boxes=[_box(c["can"], 10, 10, 30, 30)], expected_version=0)
    page = _admin_page(browser, live_server, viewport={"width": 1280, "height": 900})
    _open(page, live_server, project, image)
    page.keyboard.press("b")
    # Meanwhile someone else saves version 2.
    theirs = [_box(c["glass"], 100, 100, 20, 20)]
    box_service.box_set(image=image, head=head, boxes=theirs, expected_version=1)
    page.keyboard.press("Control+s")
    alert = page.wait_for_selector(f"{EDITOR} .be-alert:not([hidden])")
    assert "someone else changed these boxes meanwhile (now version 2, 1 boxes" in alert.inner_text()
    assert "Nothing was overwritten" in alert.inner_text()
    assert _stored(image, head) == (2, [(100.0, 100.0, 20.0, 20.0, "glass", "human", None)])
    state = page.evaluate(STATE)
    assert state["dirty"] and len(state["boxes"]) == 2  # the editor keeps the edits
    # Leaving with unsaved edits asks first.
    dialogs = []
    page.once("dialog", lambda d: (dialogs.append(d.type), d.dismiss()))
    page.close(run_before_unload=True)
    page.wait_for_timeout(300)
    assert dialogs == ["beforeunload"]

    page = _admin_page(browser, live_server, viewport={"width": 1280, "height": 900})
    _open(page, live_server, project, image)
    page.keyboard.press("b")
    box_service.box_set(image=image, head=head, boxes=[], expected_version=2)
    page.keyboard.press("s")
    page.wait_for_selector(f"{EDITOR} .be-alert:not([hidden])")
    page.click(f"{EDITOR} [data-do=reload]")  # offered: the current boxes
    page.wait_for_selector(f"{EDITOR} .be-status:has-text('Loaded the current boxes')")
    state = page.evaluate(STATE)
    assert state["version"] == 3 and state["boxes"] == [] and not state["dirty"]
    assert _stored(image, head) == (3, [])
    # A set the server refuses (400): its message is shown, naming the box; nothing is saved.
    c["glass"].delete()  # removed after the page loaded: the picker still offers it
    page.keyboard.press("3")
    page.keyboard.press("b")
    page.keyboard.press("s")
    alert = page.wait_for_selector(f"{EDITOR} .be-alert:not([hidden])")
    assert "Not saved: Nothing was saved: box 0: class_id" in alert.inner_text()
    assert "is not a class of container" in alert.inner_text()
    assert _stored(image, head) == (3, [])


def test_two_hundred_boxes_stay_fast(browser, live_server, shelf):  # noqa: F811
    project, head, c = shelf
    image = ImageFactory(project=project, data=_jpeg(2000, 1200))
    cls = [c["bottle"], c["can"], c["glass"], c["unknown_container"]]
    many = []
    for row in range(10):
        for col in range(20):
            i = row * 20 + col
            source, score = ("model", 0.5) if i % 3 == 0 else ("human", None)
            many.append(_box(cls[i % 4], 10 + col * 99, 10 + row * 119, 80, 100, source, score))
    box_service.box_set(image=image, head=head, boxes=many, expected_version=0)
    page = _admin_page(browser, live_server, viewport={"width": 1280, "height": 900})
    t0 = time.perf_counter()
    _open(page, live_server, project, image)
    load_s = time.perf_counter() - t0
    assert page.locator(f"{EDITOR} .be-box").count() == 200

    t0 = time.perf_counter()
    for _ in range(50):
        page.keyboard.press("n")
        page.keyboard.press("ArrowRight")
    page.evaluate("new Promise(r => requestAnimationFrame(() => r()))")
    nudge_s = time.perf_counter() - t0
    stats = page.evaluate("window.loupeBoxEditors[0].stats")
    handler = sorted(stats["keys"])
    frames = sorted(stats["frames"])
    t0 = time.perf_counter()
    page.keyboard.press("s")
    page.wait_for_selector(f"{EDITOR} .be-status:has-text('Saved 200 boxes')")
    save_s = time.perf_counter() - t0
    print(
        f"\n200 boxes: page load to editor ready {load_s * 1000:.0f} ms; "
        f"50× (select next + nudge) {nudge_s * 1000:.0f} ms "
        f"({nudge_s * 1000 / 100:.1f} ms per key through Playwright); in the page, key handler median "
        f"{handler[len(handler) // 2]:.2f} ms, max {handler[-1]:.2f} ms; key → next frame median "
        f"{frames[len(frames) // 2]:.1f} ms, p95 {frames[int(len(frames) * 0.95)]:.1f} ms; save round trip "
        f"{save_s * 1000:.0f} ms"
    )
    assert len(handler) == 100
    assert load_s < 5 and nudge_s < 10 and save_s < 3
    assert handler[len(handler) // 2] < 8 and handler[-1] < 100  # ms, on a shared 2-core machine
    version, rows = _stored(image, head)
    moved = [(r, b) for r, b in zip(rows, many, strict=True) if r[0] != b["x"]]
    assert version == 2 and len(moved) == 50  # the first 50 in reading order: rows 0 and 1, half of row 2
    assert all(r[0] == b["x"] + 1 and r[1] == b["y"] for r, b in moved)
    assert {b["y"] for _, b in moved} == {10, 129, 248}
    assert all(r[5] == "human" for r, b in moved)  # a moved suggestion is accepted

    # A mouse drag of one box among 200: each animation frame updates that box only.
    first = page.locator(f"{EDITOR} .be-box.sel rect").bounding_box()
    x, y = first["x"] + first["width"] / 2, first["y"] + first["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    t0 = time.perf_counter()
    page.mouse.move(x + 200, y + 100, steps=60)
    page.mouse.up()
    drag_s = time.perf_counter() - t0
    frames = sorted(page.evaluate("window.loupeBoxEditors[0].stats.drag"))
    print(
        f"drag over 60 mouse moves: {drag_s * 1000:.0f} ms, {len(frames)} frames, per frame median "
        f"{frames[len(frames) // 2]:.2f} ms, max {frames[-1]:.2f} ms"
    )
    assert frames and frames[len(frames) // 2] < 4 and drag_s < 5


def test_mouse_draws_moves_resizes_and_zoom_keeps_boxes_aligned(browser, live_server, shelf):  # noqa: F811
    project, head, c = shelf
    image = ImageFactory(project=project, data=_jpeg(480, 320))
    page = _admin_page(browser, live_server, viewport={"width": 1280, "height": 900})
    _open(page, live_server, project, image)

    def screen(ix, iy):
        vp = page.locator(f"{EDITOR} .be-viewport").bounding_box()
        s = page.evaluate(STATE)
        return vp["x"] + s["tx"] + ix * s["scale"], vp["y"] + s["ty"] + iy * s["scale"]

    def drag(a, b):
        page.mouse.move(*screen(*a))
        page.mouse.down()
        page.mouse.move(*screen(*b), steps=6)
        page.mouse.up()

    page.select_option(f"{EDITOR} .be-class", label="3 glass")
    drag((50, 50), (150, 120))  # draw
    assert _selected(page) == (50, 50, 100, 70)
    drag((100, 85), (130, 95))  # move
    assert _selected(page) == (80, 60, 100, 70)
    drag((180, 130), (200, 140))  # the south-east handle
    assert _selected(page) == (80, 60, 120, 80)

    # Wheel zoom around the cursor: the box's outline stays on the same photo pixels.
    cursor = screen(140, 100)
    page.mouse.move(*cursor)
    page.mouse.wheel(0, -600)
    page.wait_for_function(f"{STATE}.scale > 3")
    s = page.evaluate(STATE)
    vp = page.locator(f"{EDITOR} .be-viewport").bounding_box()
    for name, (ix, iy) in {"nw": (80, 60), "se": (200, 140)}.items():  # the corner handles sit on the corners
        r = page.locator(f"{EDITOR} .be-handles [data-h={name}]").bounding_box()
        assert r["x"] + r["width"] / 2 == pytest.approx(vp["x"] + s["tx"] + ix * s["scale"], abs=1)
        assert r["y"] + r["height"] / 2 == pytest.approx(vp["y"] + s["ty"] + iy * s["scale"], abs=1)
    # The photo point under the cursor stayed under it (to a screen pixel before the zoom: mouse events have whole
    # coordinates).
    assert (cursor[0] - vp["x"] - s["tx"]) / s["scale"] == pytest.approx(140, abs=0.6)
    assert (cursor[1] - vp["y"] - s["ty"]) / s["scale"] == pytest.approx(100, abs=0.6)
    drag((90, 70), (95, 72))  # a drag at this zoom moves by photo pixels
    assert _selected(page) == (85, 62, 120, 80)
    page.keyboard.press("0")
    page.click(f"{EDITOR} [data-do=save]")
    page.wait_for_selector(f"{EDITOR} .be-status:has-text('Saved 1 boxes (version 1)')")
    assert _stored(image, head) == (1, [(85.0, 62.0, 120.0, 80.0, "glass", "human", None)])


def test_box_queue_keyboard_only(browser, live_server, shelf):  # noqa: F811
    """The shelf box queue (review.box_queue) with the keyboard only: reject one suggestion, accept the rest, save,
    d = done; the next photo loads; Shift+Enter accepts all of it and finishes; the queue is then empty. A done
    with unsaved edits is refused in the page."""
    from review import box_queue  # noqa: PLC0415
    from review.models import ReviewItem  # noqa: PLC0415

    project, head, c = shelf
    first = ImageFactory(project=project, data=_jpeg(320, 240))
    second = ImageFactory(project=project, data=_jpeg(320, 241))  # another photo (content-addressed)
    planted = {
        first: [_box(c["bottle"], 20, 20, 40, 80, "model", 0.3), _box(c["can"], 100, 20, 40, 80, "model", 0.9)],
        second: [_box(c["can"], 200, 100, 50, 60, "model", 0.5)],
    }
    for image, boxes in planted.items():  # the detector's suggestions as the shelf endpoint leaves them (version 0)
        box_set, _ = BoxSet.objects.get_or_create(image=image, head=head)
        Box.objects.bulk_create(
            [Box(box_set=box_set, label_class_id=b.pop("class_id"), order=i, **b) for i, b in enumerate(boxes)]
        )
    assert box_queue.box_queue_sweep(project=project) == 2
    page = _admin_page(browser, live_server, viewport={"width": 1280, "height": 900})
    page.goto(f"{live_server.url}/p/{project.slug}/review/boxes/")
    page.wait_for_selector(f"{EDITOR}[data-ready='1']")
    assert page.evaluate("document.activeElement.classList.contains('be-viewport')")
    assert "2 left" in page.inner_text("#review-panel")
    page.keyboard.press("Tab")  # the first box in reading order: the bottle (0.30)
    assert _selected(page) == (20, 20, 40, 80)
    page.keyboard.press("r")  # reject it; the next suggestion is selected
    page.keyboard.press("d")  # not saved yet: refused in the page, nothing sent
    assert "Save your box edits first" in page.inner_text("#review-status")
    page.keyboard.press("Shift+A")
    page.keyboard.press("s")
    page.wait_for_selector(f"{EDITOR} .be-status:has-text('Saved 1 boxes (version 1)')")
    page.keyboard.press("d")
    page.wait_for_selector("text=corrected")
    page.wait_for_selector(f"{EDITOR}[data-ready='1']")
    assert _stored(first, head) == (1, [(100.0, 20.0, 40.0, 80.0, "can", "human", None)])
    assert "1 left" in page.inner_text("#review-panel")
    page.keyboard.press("Shift+Enter")  # accept every suggestion of the second photo and finish
    page.wait_for_selector("text=No shelf photo waits for a box review")
    assert _stored(second, head) == (1, [(200.0, 100.0, 50.0, 60.0, "can", "human", None)])
    got = dict(ReviewItem.objects.filter(project=project, queue="boxes").values_list("image_id", "resolution"))
    assert got == {first.id: "corrected", second.id: "accepted"}
