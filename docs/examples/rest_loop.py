"""Drive Loupe's whole loop over REST only: create a project, upload labeled photos, fix a label, retrain,
wait for the promoted model, recognise a photo. Needs `requests` (pip install requests) and an API token
(`manage.py drf_create_token <user>`; `make demo` prints one).

    python docs/examples/rest_loop.py http://127.0.0.1:8000 TOKEN path/to/photos

`path/to/photos` holds one folder per class (`red/`, `blue/`, ...) of JPEG/PNG photos named `<ID>_<seq>.jpg`
(photos sharing an ID are one group: they never cross train/val/test). The tests run this file against a live
server and a real Celery worker (tests/test_rest_example.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import requests


class Loupe:
    def __init__(self, base_url: str, token: str):
        self.base = base_url.rstrip("/") + "/api/v1"
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, expect=(200,), **kwargs):
        response = self.http.request(method, self.base + path, timeout=60, **kwargs)
        if response.status_code not in expect:  # every error has one shape: {"error": {"code", "message"}}
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None


def run(
    base_url: str,
    token: str,
    photos: Path,
    *,
    slug: str = "rest-demo",
    config: dict | None = None,
    settings: dict | None = None,
    timeout: float = 900.0,
    log=print,
) -> dict:
    api = Loupe(base_url, token)
    # 1. A project with its own head (the sku preset's training recipe).
    api.call(
        "POST",
        "/projects/",
        expect=(201,),
        json={"name": "REST demo", "slug": slug, "preset": "sku", "heads": [{"name": "color"}]},
    )
    if settings:  # e.g. {"min_image_side": 64} for small photos: one undoable action in the project's log
        api.call("PATCH", f"/projects/{slug}/", json=settings)
    # 2. Upload the photos, a request per class, labeled by their folder.
    for folder in sorted(p for p in photos.iterdir() if p.is_dir()):
        files = [("images", (f.name, f.read_bytes())) for f in sorted(folder.iterdir()) if f.is_file()]
        out = api.call(
            "POST", f"/projects/{slug}/images/upload/", expect=(201,), files=files, data={"label.color": folder.name}
        )
        log(f"uploaded {len(out['created'])} {folder.name} photo(s)")
    # 3. Fix one label, sending the version we read (a stale one would be a 409 with the current value).
    first = api.call("GET", f"/projects/{slug}/images/", params={"page_size": 1})["results"][0]
    color = next(lb for lb in first["labels"] if lb["head"] == "color")
    api.call(
        "PUT",
        f"/projects/{slug}/images/{first['id']}/labels/color/",
        json={"label": color["label"], "version": color["version"]},
    )
    # 4. Retrain and wait for the run.
    run_ = api.call("POST", f"/projects/{slug}/runs/", expect=(202,), json={"config": config or {}})
    deadline = time.monotonic() + timeout
    while run_["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_['id']} still {run_['status']} after {timeout:.0f} s")
        time.sleep(1)
        run_ = api.call("GET", f"/projects/{slug}/runs/{run_['id']}/")
    if run_["status"] != "succeeded":
        raise RuntimeError(f"run {run_['id']} {run_['status']}: {run_['error']}")
    log(f"run {run_['id']} trained model v{run_['model_version']}: {run_['metrics']}")
    # 5. The first model is promoted by itself once its index is built; a later one would need
    #    POST /projects/<slug>/models/<n>/promote/.
    while True:
        versions = api.call("GET", f"/projects/{slug}/models/")["results"]  # newest first, cursor-paginated
        active = [v for v in versions if v["is_active"]]
        if active:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("no active model")
        time.sleep(1)
    # 6. Recognise a photo.
    photo = next(f for f in sorted(photos.rglob("*")) if f.is_file())
    answer = api.call("POST", f"/projects/{slug}/recognize", files=[("images", (photo.name, photo.read_bytes()))])
    log(
        f"{photo.parent.name}/{photo.name} -> {answer['heads']['color']['label']} "
        f"({answer['heads']['color']['confidence']:.2f})"
    )
    return {"run": run_, "version": active[0]["number"], "answer": answer}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    run(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
