"""Shared by the review tests and the browser tests: planted out-of-fold files on a trained version (conftest's
`trained_version` fixture trains it) and the mislabel queue built from them."""

import json
from pathlib import Path

import numpy as np

from labeling.models import Label, LabelClass

COLORS = ["red", "blue", "green", "yellow"]


def plant(project, version, flips: int = 4):
    """Write out-of-fold files where the model is sure of every image's true colour, after relabeling `flips`
    images to a wrong colour in the database (the "given" labels the queue must doubt). Returns the flipped
    image ids -> true class name."""
    head = project.heads.get()
    classes = {c.name: c for c in LabelClass.objects.filter(head=head)}
    labels = list(Label.objects.filter(head=head).select_related("label_class").order_by("image_id"))
    truth = {lb.image_id: lb.label_class.name for lb in labels}
    flipped = {}
    rng = np.random.default_rng(0)
    for lb in labels[:: max(1, len(labels) // flips)][:flips]:
        wrong = COLORS[(COLORS.index(truth[lb.image_id]) + 1) % 4]
        Label.objects.filter(pk=lb.pk).update(label_class=classes[wrong])
        flipped[lb.image_id] = truth[lb.image_id]
    given = dict(Label.objects.filter(head=head).values_list("image_id", "label_class__name"))
    ids = np.array(sorted(given), dtype=np.int64)
    probs = np.full((len(ids), 4), 0.02, dtype=np.float32)
    for i, image_id in enumerate(ids):
        probs[i, COLORS.index(truth[int(image_id)])] = 0.94 - 0.001 * i  # sure of the true colour
    probs /= probs.sum(axis=1, keepdims=True)
    targets = np.array([COLORS.index(given[int(i)]) for i in ids])
    out = Path(version.artifact_dir) / "oof"
    out.mkdir(exist_ok=True)
    np.savez(
        out / "oof_predictions.npz",
        ids=ids,
        fold=rng.integers(0, 3, len(ids)),
        probs_class=probs,
        targets_class=targets,
    )
    (out / "oof_meta.json").write_text(json.dumps({"heads": {"class": {"classes": COLORS}}}))
    return flipped


def queue_mislabels(project, version) -> dict:
    """Plant a trained version's out-of-fold files (see plant) and build the mislabel queue from them; returns
    the flipped image ids -> true class name."""
    from review import services  # noqa: PLC0415

    flipped = plant(project, version)
    services.mislabel_refresh(version=version)
    return flipped
