"""Storage beyond one disk, against a real S3-compatible server (moto's standalone server on loopback): photos
stored content-addressed in the bucket and read through this process's cache; model artifacts published by the
worker that wrote them and fetched by any other process, changed files fetched again."""

import hashlib
import io
import os
import time
from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from PIL import Image as PILImage

from labeling import storage

pytestmark = pytest.mark.django_db


def _jpeg(color=(200, 30, 30), side=64) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (side, side), color).save(buf, "JPEG")
    return buf.getvalue()


def _stored(data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    name = storage.image_name("p", sha, ".jpg")
    assert storage.store_bytes(name, data)
    return name


def test_settings_choose_the_store_from_storage_url(monkeypatch):
    from environ import ImproperlyConfigured

    from webapp.settings import _default_storage

    assert _default_storage("")["BACKEND"].endswith("FileSystemStorage")
    assert _default_storage("file:///var/loupe")["BACKEND"].endswith("FileSystemStorage")
    monkeypatch.setenv("AWS_S3_ENDPOINT_URL", "http://minio:9000")
    s3 = _default_storage("s3://photos/team-a/")
    assert s3["BACKEND"] == "storages.backends.s3.S3Storage"
    assert s3["OPTIONS"]["bucket_name"] == "photos" and s3["OPTIONS"]["location"] == "team-a"
    assert s3["OPTIONS"]["endpoint_url"] == "http://minio:9000"
    with pytest.raises(ImproperlyConfigured, match="bucket name is missing"):
        _default_storage("s3:///x")
    with pytest.raises(ImproperlyConfigured, match="s3://bucket"):
        _default_storage("gs://bucket")


def test_a_local_store_is_used_in_place(settings):
    assert not storage.is_remote()
    name = _stored(_jpeg())
    assert storage.local_path(name) == str(Path(settings.MEDIA_ROOT) / name)
    assert storage.artifact_publish(settings.ARTIFACT_ROOT) == 0  # nothing to publish: every process sees the disk


def test_photos_live_in_the_bucket_and_are_read_through_a_cache_keyed_by_content(s3_store, settings):
    import boto3

    assert storage.is_remote()
    data = _jpeg()
    name = _stored(data)
    assert not storage.store_bytes(name, data)  # content-addressed: a second write of the same photo is a no-op
    assert not Path(settings.MEDIA_ROOT).exists()  # nothing on this machine's disk
    keys = [o.key for o in default_storage.bucket.objects.all()]
    assert keys == [f"loupe/{name}"]
    path = Path(storage.local_path(name))
    sha = hashlib.sha256(data).hexdigest()
    assert path == Path(settings.LOUPE_CACHE_DIR) / "blobs" / sha[:2] / f"{sha}.jpg"
    assert path.read_bytes() == data
    # A second read is served by the cache: the bucket is not asked again (the object is gone, the copy is not).
    boto3.resource(
        "s3",
        endpoint_url=s3_store["AWS_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).Object(s3_store["bucket"], f"loupe/{name}").delete()
    assert storage.local_path(name) == str(path)
    # The same content in another project shares the cached copy.
    assert storage.local_path(storage.image_name("other", sha, ".jpg")) == str(path)
    # Thumbnails and full photos are served by the web process straight from the store.
    thumb = storage.make_thumbnail(data)
    assert storage.store_bytes(storage.thumb_name("p", sha), thumb)
    with default_storage.open(storage.thumb_name("p", sha), "rb") as fh:
        assert fh.read() == thumb


def test_a_photo_missing_from_the_store_is_an_error_not_a_hang(s3_store, settings):
    with pytest.raises(FileNotFoundError, match="does not exist|not in the file store"):
        storage.local_path("images/p/ab/" + "ab" * 32 + ".jpg")
    name = _stored(_jpeg())
    paths = storage.local_paths([name, "images/p/cd/" + "cd" * 32 + ".jpg"])
    assert paths[0] is not None and Path(paths[0]).is_file() and paths[1] is None
    assert not any(p.name.startswith(".part-") for p in Path(settings.LOUPE_CACHE_DIR).rglob("*"))  # no half files


def _run_folder(root: Path) -> Path:
    art = root / "shop" / "run-7"
    (art / "checkpoints").mkdir(parents=True)
    (art / "model.pt").write_bytes(b"weights" * 1000)
    (art / "metrics.json").write_text('{"top1": 0.9}')
    (art / "oof").mkdir()
    (art / "oof" / "oof_meta.json").write_text("{}")
    (art / "checkpoints" / "latest.pt").write_bytes(b"resume state")
    (art / ".part-x").write_bytes(b"half")
    return art


def test_artifacts_are_published_and_fetched_by_a_process_with_an_empty_cache(s3_store, settings, tmp_path):
    worker_root = tmp_path / "worker-artifacts"
    art = _run_folder(worker_root)
    assert storage.artifact_publish(art) == 3
    keys = sorted(o.key for o in default_storage.bucket.objects.all())
    assert keys == [
        "loupe/artifacts/shop/run-7/metrics.json",
        "loupe/artifacts/shop/run-7/model.pt",
        "loupe/artifacts/shop/run-7/oof/oof_meta.json",
    ]  # the resume checkpoint and temp files stay on the worker
    # The worker itself fetches nothing back: its files carry the stored times.
    settings.ARTIFACT_ROOT = worker_root
    storage._synced.clear()
    before = {p: p.stat().st_mtime_ns for p in art.rglob("*") if p.is_file()}
    assert storage.artifact_local(str(art)) == art
    assert {p: p.stat().st_mtime_ns for p in art.rglob("*") if p.is_file()} == before
    # Another process: its own (empty) artifact root, the worker's path stored in the database.
    settings.ARTIFACT_ROOT = tmp_path / "web-artifacts"
    storage._synced.clear()
    local = storage.artifact_local(str(art))
    assert local == tmp_path / "web-artifacts" / "shop" / "run-7"
    assert (local / "model.pt").read_bytes() == (art / "model.pt").read_bytes()
    assert json_of(local / "metrics.json") == {"top1": 0.9}
    assert (local / "oof" / "oof_meta.json").is_file() and not (local / "checkpoints").exists()
    # An index rebuilt on the worker (same size, new content) reaches the web process after the sync interval.
    settings.LOUPE_ARTIFACT_SYNC_SECONDS = 0
    time.sleep(1.1)  # the store keeps whole seconds
    started = time.time()
    (art / "metrics.json").write_text('{"top1": 0.8}')
    (art / "index.json").write_text("{}")
    assert storage.artifact_publish(art, since=started) == 2  # only what changed
    assert json_of(storage.artifact_local(str(art)) / "metrics.json") == {"top1": 0.8}
    assert (local / "index.json").is_file()


def test_a_version_folder_the_store_lacks_is_returned_as_is(s3_store, tmp_path):
    local = storage.artifact_local(str(tmp_path / "x" / "run-1"))
    assert not local.exists()  # the callers report the missing model file (model_file_missing)


def json_of(path: Path):
    import json

    return json.loads(path.read_text())


def test_the_web_process_serves_photos_from_the_bucket_through_its_cache(s3_store, admin_client, settings):
    from labeling.tests.factories import ImageFactory, ProjectFactory

    data = _jpeg((10, 200, 10))
    name = _stored(data)
    thumb = storage.thumb_name("p", hashlib.sha256(data).hexdigest())
    storage.store_bytes(thumb, storage.make_thumbnail(data))
    project = ProjectFactory()
    image = ImageFactory(project=project, file=name, thumbnail=thumb, sha256=hashlib.sha256(data).hexdigest())
    full = admin_client.get(f"/p/{project.slug}/images/{image.pk}/full")
    assert full.status_code == 200 and b"".join(full.streaming_content) == data
    assert admin_client.get(f"/p/{project.slug}/images/{image.pk}/thumb").status_code == 200
    gone = ImageFactory(project=project, color="blue")
    default_storage.delete(gone.file)  # lost from the bucket (and never cached here)
    assert admin_client.get(f"/p/{project.slug}/images/{gone.pk}/full").status_code == 404


def test_the_cache_is_bounded_by_cache_prune_oldest_first(s3_store, settings):
    from django.core.management import call_command

    names = [_stored(_jpeg((i * 40, 10, 10))) for i in range(3)]
    paths = [Path(storage.local_path(n)) for n in names]
    for age, path in zip((300, 200, 100), paths, strict=True):  # the first fetched the longest ago
        t = time.time() - age
        os.utime(path, (t, t))
    keep = paths[2].stat().st_size
    out = storage.cache_prune(max_bytes=keep)
    assert out["deleted"] == 2 and out["kept"] == 1 and not paths[0].exists() and paths[2].exists()
    assert Path(storage.local_path(names[0])).read_bytes()  # fetched again on the next read
    buf = io.StringIO()
    call_command("cache_prune", "--max-gb", "0", stdout=buf)
    assert "2 cached photo(s) deleted" in buf.getvalue() and not any(p.exists() for p in paths)
