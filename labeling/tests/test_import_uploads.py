"""Browser uploads as import jobs (the Import page's drop zone, issue 17.3): staged through the storage API in
several requests, checked per file at the edge, imported by the import job in batches, and no staged file left
behind whatever the end (done, failed, cancelled, abandoned)."""

import datetime as dt

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone

from conftest import make_photo
from labeling import import_jobs, import_uploads, importers
from labeling.models import Image, ImportRun, ImportUpload, ImportUploadFile, Label, LabelClass, ProjectMember
from labeling.services import project_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def project():
    p = project_create(name="Parts", preset="retrieval")
    p.min_image_side = 32
    p.save(update_fields=["min_image_side"])
    return p


@pytest.fixture
def admin(client, admin_user):
    client.force_login(admin_user)
    return client


def _photo(path: str, color: str = "red", seed: int = 0, data: bytes | None = None) -> SimpleUploadedFile:
    return SimpleUploadedFile(path.rsplit("/", 1)[-1], make_photo(color, seed=seed) if data is None else data)


def _create(client, project) -> dict:
    response = client.post(reverse("labeling:upload-create", args=[project.slug]))
    assert response.status_code == 201, response.content
    return response.json()


def _send(client, upload: dict, files: dict[str, SimpleUploadedFile], **extra):
    return client.post(upload["urls"]["files"], {"files": list(files.values()), "paths": list(files)}, **extra)


def _staged_files() -> list[str]:
    """Every file left under uploads/ in the storage (through the storage API: S3 has no folders to walk)."""

    def walk(folder):
        if not default_storage.exists(folder):
            return []
        dirs, files = default_storage.listdir(folder)
        return [f"{folder}/{f}" for f in files] + [x for d in dirs for x in walk(f"{folder}/{d}")]

    return walk("uploads")


def _start(client, upload: dict, **options):
    return client.post(upload["urls"]["start"], {"labeling": "folder", **options})


def test_a_dropped_folder_tree_is_staged_then_imported_with_classes_from_folders(admin, project, settings):
    settings.LOUPE_IMPORT_BATCH = 2
    upload = _create(admin, project)
    first = {f"shapes/red/R{i:03d}_0.jpg": _photo("x", "red", seed=i) for i in range(3)}
    first["shapes/notes.txt"] = SimpleUploadedFile("notes.txt", b"hello")  # not an image name
    out = _send(admin, upload, first).json()
    assert [s["path"] for s in out["staged"]] == [f"shapes/red/R{i:03d}_0.jpg" for i in range(3)]
    assert out["refused"] == [{"path": "shapes/notes.txt", "reason": out["refused"][0]["reason"]}]
    assert "not an image file name" in out["refused"][0]["reason"]
    second = {f"shapes/blue/B{i:03d}_0.jpg": _photo("x", "blue", seed=i) for i in range(2)}
    second["shapes/blue/fake.jpg"] = SimpleUploadedFile("fake.jpg", b"<html>not a photo</html>")  # sniffed
    out = _send(admin, upload, second).json()
    assert len(out["staged"]) == 2 and out["files"] == 5
    assert "not an image (the content is not JPEG" in out["refused"][0]["reason"]
    # A retried request (the same paths again) replaces its own copies: still 5 staged files.
    again = {f"shapes/blue/B{i:03d}_0.jpg": _photo("x", "blue", seed=i) for i in range(2)}
    assert _send(admin, upload, again).json()["files"] == 5
    assert len(_staged_files()) == 5 and all(f.startswith(f"uploads/{project.slug}/") for f in _staged_files())
    assert not Image.objects.filter(project=project).exists()  # nothing imported before the start

    response = _start(admin, upload)
    assert response.status_code == 202, response.content
    run = ImportRun.objects.get(pk=response.json()["job"]["id"])
    assert (run.mode, run.status, run.params["files"]) == ("upload", "queued", 5)
    done = import_jobs.import_run_execute(run_id=run.id)
    assert done.status == "succeeded", done.error
    assert (done.done, done.total, done.report["created"]) == (5, 5, 5)
    head = project.heads.get()
    classes = dict(
        Label.objects.filter(image__project=project, head=head).values_list("image__original_name", "label_class__name")
    )
    assert classes == {
        **{f"R{i:03d}_0.jpg": "red" for i in range(3)},
        **{f"B{i:03d}_0.jpg": "blue" for i in range(2)},
    }
    assert set(Image.objects.filter(project=project).values_list("group_key", flat=True)) == {
        "R000",
        "R001",
        "R002",
        "B000",
        "B001",
    }
    # Written content-addressed (images/<project>/<sha[:2]>/<sha>.jpg, a thumbnail beside it); staging gone.
    image = Image.objects.filter(project=project).first()
    assert image.file == f"images/{project.slug}/{image.sha256[:2]}/{image.sha256}.jpg"
    assert default_storage.exists(image.file) and default_storage.exists(image.thumbnail)
    assert _staged_files() == [] and not ImportUpload.objects.exists() and not ImportUploadFile.objects.exists()
    status = admin.get(reverse("labeling:import-run", args=[project.slug, run.pk])).json()
    assert status["job"]["status"] == "succeeded" and any("Imported 5 new image(s)" in x for x in status["report"])


def test_one_class_or_unlabeled_and_what_the_job_reports_per_file(admin, project):
    upload = _create(admin, project)
    photo = make_photo("red", seed=9)
    truncated = photo[: len(photo) // 2]  # its header reads, its pixels do not: imported as unreadable
    _send(admin, upload, {"a_1.jpg": _photo("a_1.jpg"), "b_1.jpg": _photo("b_1.jpg", data=truncated)})
    # "Class from folder" with loose photos is refused at the start (the photos stay staged).
    response = _start(admin, upload)
    assert response.status_code == 400 and "None of the photos sits in a folder" in response.json()["error"]["message"]
    response = _start(admin, upload, labeling="class", class_name="")
    assert response.status_code == 400 and "Give the class" in response.json()["error"]["message"]
    response = _start(admin, upload, labeling="class", class_name="Widget")
    assert response.status_code == 202
    done = import_jobs.import_run_execute(run_id=response.json()["job"]["id"])
    assert done.status == "succeeded", done.error
    assert done.report["created"] == 2 and done.report["unreadable"] == 1
    assert any("b_1.jpg" in w and "imported as unreadable" in m for w, m in done.report["warnings"])
    assert Image.objects.get(original_name="b_1.jpg").status == "unreadable"
    assert set(LabelClass.objects.filter(head__project=project).values_list("name", flat=True)) == {"Widget"}
    assert _staged_files() == []
    # Unlabeled.
    upload = _create(admin, project)
    _send(admin, upload, {"c_1.jpg": _photo("c_1.jpg", seed=3)})
    done = import_jobs.import_run_execute(run_id=_start(admin, upload, labeling="none").json()["job"]["id"])
    image = Image.objects.get(original_name="c_1.jpg")
    assert done.status == "succeeded" and Label.objects.get(image=image).label_class is None


def test_a_bad_photo_imports_nothing_unless_skip_bad_rows(admin, project, settings):
    """As the folder import: a photo with no class folder is an error; all or nothing unless "skip bad photos"."""
    for skip, created in ((False, 0), (True, 2)):
        upload = _create(admin, project)
        files = {"red/R1_0.jpg": _photo("x", seed=1), "red/R2_0.jpg": _photo("x", seed=2), "loose.jpg": _photo("x")}
        _send(admin, upload, files)
        run = _start(admin, upload, **({"skip_bad_rows": "1"} if skip else {})).json()["job"]["id"]
        done = import_jobs.import_run_execute(run_id=run)
        assert Image.objects.filter(project=project).count() == created
        assert ("loose.jpg", "sits in no folder, so it has no class from a folder's name") in [
            tuple(e) for e in done.report["errors"]
        ]
        assert done.status == ("succeeded" if skip else "failed")
        assert _staged_files() == [] and not ImportUpload.objects.exists()


def test_cancel_leaves_no_rows_and_no_files_staged_or_written(
    admin, project, settings, monkeypatch, django_capture_on_commit_callbacks
):
    # Cancelled while uploading: the staged photos go at once.
    upload = _create(admin, project)
    _send(admin, upload, {"red/R1_0.jpg": _photo("x", seed=1)})
    assert len(_staged_files()) == 1
    assert admin.post(upload["urls"]["cancel"]).json()["removed"] == 1
    assert _staged_files() == [] and not ImportUpload.objects.exists()
    response = _send(admin, upload, {"red/R2_0.jpg": _photo("x", seed=2)})  # a late request of that upload
    assert response.status_code == 404
    # Cancelled while its job runs: stops after a batch, removes what it wrote, then the staged photos.
    settings.LOUPE_IMPORT_BATCH = 2
    upload = _create(admin, project)
    _send(admin, upload, {f"red/R{i}_0.jpg": _photo("x", seed=i) for i in range(6)})
    run_id = _start(admin, upload).json()["job"]["id"]
    assert _send(admin, upload, {"red/R9_0.jpg": _photo("x", seed=9)}).status_code == 409  # started: no more
    real = importers.images_import

    def import_then_cancel(**kw):
        out = real(**kw)
        assert admin.post(reverse("labeling:import-run-cancel", args=[project.slug, run_id])).status_code == 200
        return out

    monkeypatch.setattr(importers, "images_import", import_then_cancel)
    with django_capture_on_commit_callbacks(execute=True):  # the rollback deletes the files once it commits
        done = import_jobs.import_run_execute(run_id=run_id)
    assert done.status == "cancelled"
    assert not Image.objects.filter(project=project).exists()
    assert _staged_files() == [] and not ImportUpload.objects.exists() and not ImportUploadFile.objects.exists()
    written = [p for p in (settings.MEDIA_ROOT / "images").rglob("*") if p.is_file()]
    assert written == []
    # Cancelled while queued (from the upload's own cancel): at once, staged photos gone.
    upload = _create(admin, project)
    _send(admin, upload, {"red/R1_0.jpg": _photo("x", seed=1)})
    _start(admin, upload)
    out = admin.post(upload["urls"]["cancel"]).json()
    assert out["status"] == "cancelled" and _staged_files() == [] and not ImportUpload.objects.exists()


def test_reviewers_get_403_and_another_projects_upload_is_404(client, project, reviewer, admin_user, django_user_model):
    other = project_create(name="Other", preset="retrieval")
    client.force_login(admin_user)
    theirs = _create(client, other)
    mine = _create(client, project)
    # Another project's upload id under this project's URL: 404, and nothing is staged.
    for name in ("labeling:upload-files", "labeling:upload-start", "labeling:upload-cancel"):
        url = reverse(name, args=[project.slug, theirs["id"]])
        assert client.post(url, {"files": [_photo("red/R1_0.jpg")], "paths": ["red/R1_0.jpg"]}).status_code == 404
    assert client.get(reverse("labeling:import-run", args=[project.slug, 999999])).status_code == 404
    assert _staged_files() == []
    # A reviewer: 403 on every endpoint (in the error shape); a project admin member may.
    client.force_login(reviewer)
    for url in (
        reverse("labeling:upload-create", args=[project.slug]),
        mine["urls"]["files"],
        mine["urls"]["start"],
        mine["urls"]["cancel"],
    ):
        response = client.post(url, {"files": [_photo("red/R1_0.jpg")], "paths": ["red/R1_0.jpg"]})
        assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    assert _staged_files() == [] and ImportUpload.objects.filter(project=project).count() == 1
    assert client.get(reverse("labeling:import", args=[project.slug])).status_code == 403
    ProjectMember.objects.create(project=project, user=reviewer, role="admin")
    assert _send(client, mine, {"red/R1_0.jpg": _photo("x")}).json()["files"] == 1
    # Not even visible: a members-only project of which they are not a member is 404.
    other.members_only = True
    other.save(update_fields=["members_only"])
    assert client.post(reverse("labeling:upload-create", args=[other.slug])).status_code == 404


def test_size_and_count_limits_are_named(admin, project, settings):
    settings.LOUPE_UPLOAD_REQUEST_MAX_BYTES = 200_000
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 3
    limits = import_uploads.limits()
    assert limits["file_bytes"] == 200_000 - 2**16 and limits["request_files"] == 3
    upload = _create(admin, project)
    big = make_photo("red", size=400, seed=1)  # ~100 KB of noise: fits a request, not the per-photo limit
    big = big + b"\0" * (limits["file_bytes"] + 1 - len(big))
    out = _send(admin, upload, {"red/big_1.jpg": _photo("x", data=big), "red/ok_1.jpg": _photo("x")}).json()
    assert [s["path"] for s in out["staged"]] == ["red/ok_1.jpg"]
    assert "more than the 0.1 MiB limit per photo" in out["refused"][0]["reason"]
    # A request over the limit is refused before its body is read; too many files in one request too.
    response = _send(admin, upload, {"red/a_1.jpg": _photo("x", data=big), "red/b_1.jpg": _photo("x", data=big)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = _send(admin, upload, {f"red/n{i}_1.jpg": _photo("x", seed=i) for i in range(4)})
    assert response.status_code == 400 and "at most 3" in response.json()["error"]["message"]
    # Too many pixels (from the header), an empty file, a path with "..", an empty request.
    settings.LOUPE_MAX_IMAGE_PIXELS = 50 * 50
    out = _send(
        admin,
        upload,
        {"red/px_1.jpg": _photo("x"), "red/empty_1.jpg": _photo("x", data=b""), "../up_1.jpg": _photo("x")},
    ).json()
    reasons = {r["path"]: r["reason"] for r in out["refused"]}
    assert "64×64 is more than 2,500 pixels" in reasons["red/px_1.jpg"]
    assert reasons["red/empty_1.jpg"] == "empty file" and reasons["../up_1.jpg"] == "not a usable relative path"
    response = admin.post(upload["urls"]["files"], {})
    assert response.status_code == 400 and response.json()["error"]["code"] == "empty"
    assert out["files"] == 1  # only ok_1.jpg is staged


def test_requests_need_the_csrf_token(project, admin_user):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.post(reverse("labeling:upload-create", args=[project.slug])).status_code == 403
    upload = ImportUpload.objects.create(project=project)
    url = reverse("labeling:upload-files", args=[project.slug, upload.pk])
    assert client.post(url, {"files": [_photo("red/R1_0.jpg")], "paths": ["red/R1_0.jpg"]}).status_code == 403
    assert _staged_files() == []


def test_the_reconciler_removes_abandoned_uploads_after_their_age(admin, project, settings):
    settings.LOUPE_UPLOAD_ABANDONED_SECONDS = 3600
    old, fresh = _create(admin, project), _create(admin, project)
    _send(admin, old, {"red/R1_0.jpg": _photo("x", seed=1)})
    _send(admin, fresh, {"red/R2_0.jpg": _photo("x", seed=2)})
    ImportUpload.objects.filter(pk=old["id"]).update(updated_at=timezone.now() - dt.timedelta(hours=2))
    import_jobs.import_runs_reconcile(project=project)
    assert list(ImportUpload.objects.values_list("pk", flat=True)) == [fresh["id"]]
    assert len(_staged_files()) == 1
    # The Import page lists the uploads not started (start them or cancel them).
    page = admin.get(reverse("labeling:import", args=[project.slug])).content.decode()
    assert 'id="drop-zone"' in page and f'data-upload="{fresh["id"]}"' in page and "webkitdirectory" in page


def test_an_upload_import_is_not_started_from_the_rest_api_or_twice(admin, project):
    response = admin.post(
        reverse("labeling-api:import-list", args=[project.slug]),
        {"mode": "upload", "folder": "x"},
        content_type="application/json",
    )
    assert response.status_code == 400 and "drop zone" in response.json()["error"]["message"]
    upload = _create(admin, project)
    _send(admin, upload, {"red/R1_0.jpg": _photo("x", seed=1)})
    assert _start(admin, upload).status_code == 202
    assert _start(admin, upload).status_code == 400  # already being imported
    # One import per project at a time: a second upload's start waits, its photos stay staged.
    second = _create(admin, project)
    _send(admin, second, {"red/R2_0.jpg": _photo("x", seed=2)})
    response = _start(admin, second)
    assert response.status_code == 409 and "stay" in response.json()["error"]["message"]
    assert ImportUploadFile.objects.filter(upload_id=second["id"]).count() == 1


def test_staged_uploads_live_in_s3_and_the_job_reads_them_from_there(admin, project, s3_store):
    """With S3 as the default storage, staging and the job use only the storage API (no shared disk)."""
    upload = _create(admin, project)
    _send(admin, upload, {"red/R1_0.jpg": _photo("x", seed=1), "blue/B1_0.jpg": _photo("x", "blue", seed=2)})
    names = list(ImportUploadFile.objects.values_list("name", flat=True))
    assert len(names) == 2 and all(default_storage.exists(n) for n in names)
    done = import_jobs.import_run_execute(run_id=_start(admin, upload).json()["job"]["id"])
    assert done.status == "succeeded", done.error
    assert done.report["created"] == 2 and not any(default_storage.exists(n) for n in names)
