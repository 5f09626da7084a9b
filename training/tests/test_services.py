import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from conftest import TINY_TRAIN
from labeling.services import project_create
from pipeline import chain
from training import selectors, services
from training.engine import resolve_config
from training.models import ModelVersion, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(shapes_project):
    return shapes_project(6)


def test_run_create_refuses_bad_config_empty_project_and_second_run(project):
    with pytest.raises(services.TrainingError, match="epochs_typo"):
        services.training_run_create(project=project, config={"epochs_typo": 3}, queue=False)
    empty = project_create(name="Empty", preset="sku")
    with pytest.raises(services.TrainingError, match="no usable labeled images"):
        services.training_run_create(project=empty, queue=False)
    services.training_run_create(project=project, config=TINY_TRAIN, queue=False)
    with pytest.raises(services.TrainingError, match="already queued or running"):
        services.training_run_create(project=project, queue=False)


def test_execute_records_progress_artifacts_and_promotes_first_model(project):
    run = services.training_run_create(project=project, config=TINY_TRAIN, queue=False)
    run = chain.training_run_execute(run_id=run.id, inline=True)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.epoch == run.epochs == 2 and len(run.history) == 2 and run.loss is not None
    assert set(run.metrics) == {"class"} and 0 <= run.metrics["class"]["top1"] <= 1
    art = Path(run.artifact_dir)
    for name in ("model.pt", "metrics.json", "manifest.json", "index.faiss", "config.json"):
        assert (art / name).exists(), name
    manifest = json.loads((art / "manifest.json").read_text())
    groups = {}
    for item in manifest["items"]:
        groups.setdefault(item["group"], set()).add(item["split"])
    assert all(len(s) == 1 for s in groups.values())  # a group never crosses splits
    version = run.model_version
    assert version.is_active and version.number == 1 and version.index_status == "ready"
    # Running the same run again is a no-op (idempotent task).
    again = chain.training_run_execute(run_id=run.id)
    assert again.status == run.status and ModelVersion.objects.count() == 1


def test_failed_training_records_the_error(project):
    with pytest.raises(services.TrainingError, match="no_such_backbone_x"):
        services.training_run_create(project=project, config={"backbone": "no_such_backbone_x"}, queue=False)
    run = services.training_run_create(project=project, config=TINY_TRAIN, queue=False)
    # A config that became invalid after queueing (e.g. an older Loupe) fails the run with the reason.
    TrainingRun.objects.filter(pk=run.pk).update(config={**TINY_TRAIN, "backbone": "no_such_backbone_x"})
    run = chain.training_run_execute(run_id=run.id)
    assert run.status == TrainingRun.Status.FAILED and "no_such_backbone_x" in run.error
    assert run.finished_at is not None and not ModelVersion.objects.exists()


def test_train_command(project, capsys):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_TRAIN.items()]
    call_command("train", project.slug, *sets)
    assert "Model v1" in capsys.readouterr().out
    with pytest.raises(CommandError, match="No project"):
        call_command("train", "nope")
    with pytest.raises(CommandError, match="KEY=VALUE"):
        call_command("train", project.slug, "--set", "epochs")


def test_run_trains_on_a_frozen_dataset_version_with_project_options(project):
    from labeling import health

    health.training_options_set(project=project, class_weighting="inverse", per_class_cap=4)
    run = services.training_run_create(project=project, config=TINY_TRAIN, queue=False)
    version = run.dataset_version
    assert version is not None and version.number == 1
    run = chain.training_run_execute(run_id=run.id, inline=True)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    art = Path(run.artifact_dir)
    manifest = json.loads((art / "manifest.json").read_text())
    frozen = dict(version.items.values_list("image_id", "split"))
    assert {it["id"]: it["split"] for it in manifest["items"]}.items() <= frozen.items()
    train = [it for it in manifest["items"] if it["split"] == "train"]
    for cls in ("red", "blue", "green", "yellow"):
        assert sum(1 for it in train if it["labels"]["class"] == cls) <= 4  # the per-class cap
    assert [it["id"] for it in manifest["items"] if it["split"] != "train"] == [
        i for i, s in sorted(frozen.items()) if s != "train"
    ]
    assert json.loads((art / "config.json").read_text())["class_weighting"] == "inverse"
    metrics = json.loads((art / "metrics.json").read_text())
    assert metrics["n_test"] == version.counts["splits"]["test"] > 0  # counted, never trained on
    per_class = metrics["heads"]["class"]["per_class"]
    assert per_class and all(0 <= v["accuracy"] <= 1 and v["n"] >= 1 for v in per_class.values())

    # The test split is reported on (never trained on): accuracy of the model on the frozen test images.
    test = run.model_version.metrics["test"]
    assert test["n"] == version.counts["splits"]["test"]
    assert test["heads"]["class"]["n"] == test["n"] and 0 <= test["heads"]["class"]["top1"] <= 1
    assert (art / "test_metrics.json").exists()
    onnx = run.model_version.metrics["onnx"]
    assert (art / "model.onnx").exists() and onnx["max_abs_diff"] <= 1e-4, onnx

    # The next retrain without data changes reuses the same frozen version.
    run2 = services.training_run_create(project=project, config=TINY_TRAIN, queue=False)
    assert run2.dataset_version_id == version.id

    # With an active model the health report shows per-class validation accuracy, weakest first.
    report = health.health_report_execute(
        report_id=health.health_report_create(project=project, queue=False).id, workers=1
    )
    rows = report.findings["accuracy"]["heads"]["class"]
    assert report.findings["accuracy"]["model_version"] == 1
    assert [r["accuracy"] for r in rows] == sorted(r["accuracy"] for r in rows)


def test_oof_predictions_command_on_the_active_model(project, capsys, trained_version):
    import numpy as np

    version = trained_version(project)
    call_command("oof_predictions", project.slug, "--k", "2", "--mode", "cheap")
    assert "Out-of-fold predictions for" in capsys.readouterr().out
    data = np.load(Path(version.artifact_dir) / "oof" / "oof_predictions.npz")
    frozen = dict(version.run.dataset_version.items.values_list("image_id", "split"))
    assert "test" in frozen.values()
    assert sorted(map(int, data["ids"])) == sorted(frozen)  # every frozen photo, test split included
    version.refresh_from_db()
    assert version.metrics["oof"]["k"] == 2
    with pytest.raises(CommandError, match="No such model version"):
        call_command("oof_predictions", project.slug, "--model-version", "9")


def test_yaml_preset_under_settings_project_options_and_run_overrides(project, settings, tmp_path, monkeypatch):
    from labeling import health

    preset = selectors.preset_config("retrieval", cuda=False)
    assert preset["backbone"] == "tf_efficientnet_lite0" and preset["pretrained"] is True and "cuda" not in preset
    assert preset["freeze_backbone_epochs"] > 0 and preset["early_stopping"]["patience"]  # the seeds' two phases
    assert selectors.preset_config("retrieval", cuda=True)["backbone"] == "tf_efficientnet_lite2"
    for name in ("car", "lego", "sku", "retrieval"):  # CPU: phase 2 is the tail fine-tune; CUDA: the whole network
        assert selectors.preset_config(name, cuda=False)["tail_from_block"] == 5
        assert selectors.preset_config(name, cuda=True)["tail_from_block"] is None
    from training.engine import pretrained as pretrained_lib

    for name in ("car", "lego", "sku", "retrieval"):  # every preset's backbone has weights that resolve offline
        for cuda in (False, True):
            assert pretrained_lib.bundled_for(selectors.preset_config(name, cuda=cuda)["backbone"]) is not None
    for name in ("car", "lego", "sku", "retrieval"):  # every preset is a valid engine config, on CPU and on CUDA
        project.preset = name
        assert selectors.run_config(project, {})["backbone"] == selectors.preset_config(name)["backbone"]
        assert resolve_config(selectors.preset_config(name, cuda=True))["tail_from_block"] is None
    project.preset = "retrieval"
    assert selectors.preset_config("lego")["hflip"] is False  # mirrored LEGO parts can be different parts
    cfg = selectors.run_config(project, {"epochs": 2})
    assert cfg["backbone"] == "tf_efficientnet_lite0" and cfg["epochs"] == 2 and cfg["pretrained"] is False  # conftest
    settings.LOUPE_TRAIN_OVERRIDES = {"epochs": 7, "pretrained": False}
    assert selectors.run_config(project, {})["epochs"] == 7
    assert selectors.run_config(project, {"epochs": 3})["epochs"] == 3
    health.training_options_set(project=project, class_weighting="inverse")
    project.refresh_from_db()
    assert selectors.run_config(project, {})["class_weighting"] == "inverse"
    assert selectors.run_config(project, {"class_weighting": "none"})["class_weighting"] == "none"
    bad = tmp_path / "presets"
    bad.mkdir()
    (bad / "retrieval.yaml").write_text("- just\n- a list\n")
    monkeypatch.setattr(selectors, "PRESETS_DIR", bad)
    with pytest.raises(services.TrainingError, match="mapping"):
        selectors.run_config(project, {})


def test_interrupted_run_resumes_from_its_checkpoint(project, monkeypatch, capsys):
    class WorkerLost(Exception):
        pass

    real_writer = services._progress_writer

    def dying_writer(run_id):
        write = real_writer(run_id)

        def progress(p):
            write(p)
            if p.get("phase") == "epoch" and p["epoch"] == 1:
                raise WorkerLost("the worker was killed")

        return progress

    run = services.training_run_create(project=project, config={**TINY_TRAIN, "epochs": 3}, queue=False)
    monkeypatch.setattr(services, "_progress_writer", dying_writer)
    run = chain.training_run_execute(run_id=run.id, inline=True)
    assert run.status == TrainingRun.Status.FAILED and "WorkerLost" in run.error
    assert (Path(run.artifact_dir) / "checkpoints" / "latest.pt").exists()
    monkeypatch.setattr(services, "_progress_writer", real_writer)

    call_command("train", project.slug, "--run", str(run.id))
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED
    metrics = json.loads((Path(run.artifact_dir) / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1 and metrics["epochs_run"] == 3
    with pytest.raises(CommandError, match="already succeeded"):
        call_command("train", project.slug, "--run", str(run.id))
    with pytest.raises(CommandError, match="only applies with --run"):
        call_command("train", project.slug, "--fresh")


def test_a_model_without_validation_photos_says_train_optimistic_and_is_not_auto_promoted(project, client, admin_user):
    """A dataset version frozen with no validation photos (asked for explicitly): the first model is measured on
    its training photos, so it is labelled "train (optimistic)" everywhere and waits for an admin."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    from labeling import versions
    from labeling.models import GroupSplit

    GroupSplit.objects.filter(project=project).delete()
    version, _ = versions.dataset_version_create(project=project, ratios=(1.0, 0.0, 0.0), allow_empty_eval=True)
    assert version.counts["splits"]["val"] == 0
    run = services.training_run_create(project=project, config=TINY_TRAIN, queue=False, dataset_version=version)
    run = chain.training_run_execute(run_id=run.id, inline=True)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    v = run.model_version
    assert not v.is_active and v.evaluated_on == "train (optimistic)" and run.evaluated_on == "train (optimistic)"
    assert "Not promoted automatically" in run.error

    client.force_login(admin_user)
    for url in (f"/p/{project.slug}/models/", f"/p/{project.slug}/runs/"):
        page = client.get(url).content.decode()
        assert "train (optimistic)" in page and ">val<" not in page
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    body = api.get(f"/api/v1/projects/{project.slug}/models/").json()["results"]
    assert body[0]["evaluated_on"] == "train (optimistic)"
    assert "train (optimistic)" in (Path(v.artifact_dir) / "report.md").read_text()


def test_promote_gate_promotes_a_model_no_worse_on_the_same_test_split_and_holds_a_worse_one(
    project, settings, client, admin_user, trained_version
):
    settings.LOUPE_AUTO_PROMOTE = "gate"

    good = {"epochs": 8}
    v1 = trained_version(project, **good)
    assert v1.is_active and "gate" not in v1.metrics  # the first model: nothing to compare with
    v2 = trained_version(project, epochs=1, lr=1e-7)  # learns nothing: worse than v1 on v2's test split
    gate = v2.metrics["gate"]
    assert not v2.is_active and gate["passed"] is False and gate["against"] == 1 and gate["split_of"] == 2
    assert gate["new"] < gate["active"] and gate["drop"] == round(gate["active"] - gate["new"], 4)
    assert "points of mean top-1 worse" in gate["reason"] and f"({gate['n_test']} photos)" in gate["reason"]
    client.force_login(admin_user)
    page = client.get(reverse("training:version-list", args=[project.slug])).content.decode()
    assert "waits for an admin" in page and "points of mean top-1 worse" in page

    # A manual promote of the worse model asks for confirmation, naming the drop (page and API), then goes ahead.
    url = reverse("training:version-promote", args=[project.slug, 2])
    response = client.post(url)
    assert response.status_code == 409 and "points of mean top-1 worse" in response.content.decode()
    assert not ModelVersion.objects.get(pk=v2.pk).promote_requested
    api = f"/api/v1/projects/{project.slug}/models/2/promote/"
    body = client.post(api).json()
    assert body["error"]["code"] == "promote_worse" and body["error"]["details"]["drop"] == gate["drop"]
    with pytest.raises(chain.PromoteNeedsConfirmation, match="worse"):
        chain.model_version_promote(version=v2, inline=True)
    chain.model_version_promote(version=v2, inline=True, confirm_drop=True)
    assert ModelVersion.objects.get(is_active=True) == v2

    # The same recipe as v1 again: no worse than the active v2, so it is promoted by itself.
    v3 = trained_version(project, **good)
    assert v3.metrics["gate"]["passed"] is True and v3.metrics["gate"]["against"] == 2
    assert ModelVersion.objects.get(is_active=True) == v3

    # "first": later models always wait for an admin, gate or not.
    settings.LOUPE_AUTO_PROMOTE = "first"
    v4 = trained_version(project, **good)
    assert v4.metrics["gate"]["passed"] is True and not v4.is_active
    assert "passed the gate" in client.get(reverse("training:version-list", args=[project.slug])).content.decode()


@pytest.mark.django_db(transaction=True)
def test_one_active_run_and_one_active_scan_per_project_even_when_two_requests_race(shapes_project):
    import threading

    from django.db import IntegrityError, connection, transaction

    from labeling import health
    from labeling.models import HealthReport
    from labeling.services import LabelingError

    project = shapes_project(6)
    version = services.dataset_version_create(project=project)[0]

    def race(start, errors):
        barrier = threading.Barrier(2)
        results = []

        def one():
            try:
                barrier.wait()
                results.append(start())
            except errors as exc:
                results.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    runs = race(
        lambda: services.training_run_create(project=project, queue=False, dataset_version=version),
        services.TrainingError,
    )
    assert sum(isinstance(r, TrainingRun) for r in runs) == 1 and TrainingRun.objects.count() == 1
    assert any("already queued or running" in str(r) for r in runs)
    scans = race(lambda: health.health_report_create(project=project, queue=False), LabelingError)
    assert sum(isinstance(r, HealthReport) for r in scans) == 1 and HealthReport.objects.count() == 1
    # The database itself refuses a second active row, whatever code writes it.
    with pytest.raises(IntegrityError), transaction.atomic():
        TrainingRun.objects.create(project=project, dataset_version=version)
    with pytest.raises(IntegrityError), transaction.atomic():
        HealthReport.objects.create(project=project)
    TrainingRun.objects.update(status=TrainingRun.Status.SUCCEEDED)  # a finished run does not block the next
    assert services.training_run_create(project=project, queue=False, dataset_version=version).status == "queued"
