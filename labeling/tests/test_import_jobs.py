"""Imports of any size as background jobs: batches with progress, and "nothing half-written" kept by the job's own
record — a failed, cancelled or lost import removes what it wrote (issue 17.3)."""

import datetime as dt

import pytest
from django.utils import timezone

from conftest import make_photo
from labeling import import_jobs, importers
from labeling.models import Image, ImportRun, Label, LabelClass, LabelEvent
from labeling.services import LabelingError, project_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def project():
    p = project_create(name="Parts", preset="retrieval")
    p.min_image_side = 32
    p.save(update_fields=["min_image_side"])
    return p


def _csv(tmp_path, rows):
    folder = tmp_path / "import" / "csvset"
    (folder / "img").mkdir(parents=True)
    lines = ["image_filename,class"]
    for i, cls in enumerate(rows):
        (folder / "img" / f"P{i:03d}_0.jpg").write_bytes(make_photo("red" if i % 2 else "blue", seed=i, size=64))
        lines.append(f"P{i:03d}_0.jpg,{cls}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def _run(project, folder, settings, batch=3, **params):
    settings.LOUPE_IMPORT_BATCH = batch
    run = import_jobs.import_run_create(
        project=project,
        mode="csv",
        params={
            "folder": str(folder / "img"),
            "csv": str(folder / "labels.csv"),
            "head_cols": {"class": "class"},
            **params,
        },
        queue=False,
    )
    return import_jobs.import_run_execute(run_id=run.id)


def test_an_import_job_writes_in_batches_with_progress(project, tmp_path, settings, photo_folder):
    folder = _csv(tmp_path, ["a", "b"] * 5)  # 10 photos, batches of 3
    done = _run(project, folder, settings)
    assert done.status == "succeeded", done.error
    assert (done.done, done.total, done.step) == (10, 10, "done")
    assert done.report["created"] == 10 and done.report["labels_set"] == 10
    assert Image.objects.filter(project=project, import_run=done).count() == 10
    # Again: the same photos are already there, nothing new; one import per project at a time.
    again = _run(project, folder, settings)
    assert again.report["created"] == 0 and again.report["existing"] == 10
    import_jobs.import_run_create(project=project, mode="folder", params={"folder": "x"}, queue=False)
    with pytest.raises(LabelingError, match="already queued or running"):
        import_jobs.import_run_create(project=project, mode="folder", params={"folder": "y"}, queue=False)


def test_a_failing_batch_removes_everything_the_job_wrote(project, tmp_path, settings):
    # An existing photo unlabeled: the job labels it in its first batch, then a later batch fails.
    head = project.heads.get()
    folder = _csv(tmp_path, ["a", "b", "c", "d", "e", "f", "g"])
    first = folder / "img" / "P000_0.jpg"
    rows, report = importers.plan_placeholder(first.parent)
    rows = [r for r in rows if r.path.name == first.name]
    assert importers.images_import(project=project, rows=rows, report=report).written
    before = Image.objects.get(project=project)
    assert Label.objects.get(image=before, head=head).label_class is None
    # The 7th row's class name is 300 characters: its batch (the third) is refused.
    csv = (folder / "labels.csv").read_text().replace("P006_0.jpg,g", "P006_0.jpg," + "x" * 300)
    (folder / "labels.csv").write_text(csv)
    done = _run(project, folder, settings)
    assert done.status == "failed" and "longer than 200 characters" in done.error
    assert list(Image.objects.filter(project=project)) == [before]  # the 5 photos of batches 1-2 are gone
    assert Label.objects.get(image=before, head=head).label_class is None  # its label went back
    # No orphan class: only "a" stays, which the kept photo's history names (set by the job, then undone).
    assert set(LabelClass.objects.filter(head=head).values_list("name", flat=True)) == {"a"}
    assert LabelEvent.objects.filter(image=before, reason=f"undo of import job {done.id}").count() == 1


def test_a_cancelled_import_stops_after_its_batch_and_leaves_nothing(project, tmp_path, settings, monkeypatch):
    folder = _csv(tmp_path, ["a"] * 9)
    real = importers.images_import
    calls = []

    def import_then_cancel(**kw):
        out = real(**kw)
        calls.append(1)
        ImportRun.objects.filter(pk=kw["run_id"]).update(cancel_requested_at=timezone.now())
        return out

    monkeypatch.setattr(importers, "images_import", import_then_cancel)
    done = _run(project, folder, settings)
    assert done.status == "cancelled" and len(calls) == 1  # stopped after the first batch
    assert not Image.objects.filter(project=project).exists()
    with pytest.raises(LabelingError, match="already cancelled"):
        import_jobs.import_run_cancel(run=done)
    queued = import_jobs.import_run_create(project=project, mode="folder", params={"folder": "x"}, queue=False)
    assert import_jobs.import_run_cancel(run=queued).status == "cancelled"  # queued: at once


def test_a_lost_import_is_rolled_back_then_runs_again_without_duplicates(project, tmp_path, settings):
    folder = _csv(tmp_path, ["a", "b", "c", "d"])
    settings.LOUPE_IMPORT_BATCH = 2
    run = import_jobs.import_run_create(
        project=project,
        mode="csv",
        params={"folder": str(folder / "img"), "csv": str(folder / "labels.csv"), "head_cols": {"class": "class"}},
        queue=False,
    )
    # Its worker wrote the first batch, then died (no heartbeat for an hour).
    rows, report = import_jobs.import_plan(project, "csv", run.params)
    assert importers.images_import(
        project=project, rows=rows[:2], report=report, group_by="name", run_id=run.id
    ).written
    ImportRun.objects.filter(pk=run.pk).update(status="running", heartbeat_at=timezone.now() - dt.timedelta(hours=1))
    done = import_jobs.import_run_execute(run_id=run.id)
    assert done.status == "succeeded", done.error
    assert Image.objects.filter(project=project).count() == 4 and done.report["created"] == 4


def test_bad_import_parameters_are_refused_at_once(project):
    with pytest.raises(LabelingError, match="mode must be one of"):
        import_jobs.import_run_create(project=project, mode="zip", params={"folder": "x"}, queue=False)
    with pytest.raises(LabelingError, match="needs the CSV file"):
        import_jobs.import_run_create(project=project, mode="csv", params={"folder": "x"}, queue=False)
    run = import_jobs.import_run_create(project=project, mode="folder", params={"folder": "/nowhere"}, queue=False)
    done = import_jobs.import_run_execute(run_id=run.id)
    assert done.status == "failed" and "/nowhere is not a folder" in done.error


def test_import_jobs_over_rest_and_the_command_line(project, tmp_path, settings, admin_user, reviewer, token_client):
    from io import StringIO

    from django.core.management import call_command

    folder = _csv(tmp_path, ["a", "b", "c"])  # under tmp_path/import = IMPORT_ROOTS in the tests
    api = token_client(admin_user)
    url = f"/api/v1/projects/{project.slug}/imports/"
    body = {
        "mode": "csv",
        "folder": str(folder / "img"),
        "csv": str(folder / "labels.csv"),
        "head_cols": {"class": "class"},
    }
    queued = api.post(url, body, format="json")
    assert queued.status_code == 202, queued.json()
    assert queued.json()["status"] == "queued" and queued.json()["params"]["restrict_roots"] is True
    busy = api.post(url, body, format="json")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "busy"
    done = import_jobs.import_run_execute(run_id=queued.json()["id"])
    assert done.status == "succeeded" and done.report["created"] == 3
    listed = api.get(url).json()["results"]
    assert listed[0]["id"] == done.id and listed[0]["progress"] == 1.0
    # Folders outside IMPORT_ROOTS are refused for web imports (the job fails, nothing written).
    outside = api.post(url, {**body, "folder": "/etc", "csv": "/etc/passwd"}, format="json").json()
    failed = import_jobs.import_run_execute(run_id=outside["id"])
    assert failed.status == "failed" and "outside the import folders" in failed.error
    assert token_client(reviewer).post(url, body, format="json").status_code == 403
    assert api.post(url, {"mode": "zip", "folder": "x"}, format="json").status_code == 400
    # The command line queues one too, and the Jobs list shows it with its queue.
    out = StringIO()
    call_command(
        "import_images",
        project.slug,
        str(folder / "img"),
        "--csv",
        str(folder / "labels.csv"),
        "--head",
        "class=class",
        "--background",
        stdout=out,
    )
    run = ImportRun.objects.filter(project=project).latest("id")
    assert f"Import {run.id} queued" in out.getvalue() and run.status == "queued"
    jobs = api.get(f"/api/v1/projects/{project.slug}/jobs/").json()
    row = next(j for j in jobs if j["type"] == "importrun" and j["id"] == run.id)
    assert row["queue"] == "default" and row["what"] == "import"
    cancelled = api.post(f"/api/v1/projects/{project.slug}/jobs/importrun/{run.id}/cancel/").json()
    assert cancelled["status"] == "cancelled"


def test_the_import_page_queues_a_background_import(project, tmp_path, client, admin_user):
    folder = _csv(tmp_path, ["a", "b"])
    client.force_login(admin_user)
    response = client.post(
        f"/p/{project.slug}/import/",
        {
            "mode": "csv",
            "folder": str(folder / "img"),
            "csv_path": str(folder / "labels.csv"),
            "head_map": "class=class",
            "filename_col": "image_filename",
            "group_by": "auto",
            "background": "on",
        },
    )
    assert response.status_code == 302 and response["Location"] == f"/p/{project.slug}/jobs/"
    run = ImportRun.objects.get(project=project)
    assert run.params["restrict_roots"] and run.params["head_cols"] == {"class": "class"}
    assert import_jobs.import_run_execute(run_id=run.id).report["created"] == 2
    page = client.get(f"/p/{project.slug}/jobs/").content.decode()
    assert f'data-job="importrun/{run.id}"' in page
