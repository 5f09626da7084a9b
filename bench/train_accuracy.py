"""Real-data accuracy under the same CPU time budget per arm (make bench-accuracy).

Datasets (read in place, never copied): ../shared/datasets/grocery-store (train → val; heads coarse + fine, fine
under coarse) and ../shared/datasets/clothing-small (train → validation; one head). Every arm trains
mobilenetv3_small_100 from random init (no pretrained weights can be downloaded here) at 128 px, batch 32, on this
CPU, for at most BUDGET seconds of training (LOUPE_BENCH_BUDGET_S, default 240), and picks its best epoch on the
validation split, which is also what is reported (the datasets' READMEs: their test splits are withheld).

Arms:
  baseline  a plain single-head loop: timm model + cross-entropy + AdamW (lr 1e-3, constant), torchvision
            RandomResizedCrop + flip, PIL full decode; the fine (leaf) head only; coarse accuracy for grocery is
            read off the predicted fine class's parent.
  softmax   our engine, multi-head softmax (grocery: coarse + fine), default recipe.
  arcface   our engine with the leaf head as an ArcFace head (512-d); Recall@1 of the validation photos against
            a Faiss gallery of the train split, and the ArcFace head's own top-1.
Run: .venv/bin/python -m bench.train_accuracy  (writes bench/results/train_accuracy.json)."""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from bench.common import metric, table, write
from training.engine import train_model
from training.engine.loop import resolve_num_workers, resolve_torch_threads

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
BUDGET = float(os.environ.get("LOUPE_BENCH_BUDGET_S", 240))
BACKBONE, SIZE, BATCH = "mobilenetv3_small_100", 128, 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EST_IMAGES_PER_S = 90  # bench-train measured ~100 img/s for this model/size on this CPU: sizes the cosine schedule


def grocery() -> dict:
    root = DATA / "grocery-store"
    names = {}
    with open(root / "classes.csv", newline="") as f:
        for row in csv.reader(f):
            if row and row[1].strip().isdigit():
                names[int(row[1])] = (row[0].strip(), row[2].strip())

    def read(split_file: str, split: str) -> list[dict]:
        items = []
        for line in (root / split_file).read_text().splitlines():
            if not line.strip():
                continue
            path, fine_id, _coarse_id = (x.strip() for x in line.split(","))
            fine, coarse = names[int(fine_id)]
            items.append({"path": str(root / path), "labels": {"coarse": coarse, "fine": fine}, "split": split})
        return items

    items = read("train.txt", "train") + read("val.txt", "val")
    fine_to_coarse = {v[0]: v[1] for v in names.values()}
    heads = [
        {"name": "coarse", "classes": sorted({v[1] for v in names.values()}), "parent": None},
        {"name": "fine", "classes": sorted(fine_to_coarse), "parent": "coarse", "class_parents": fine_to_coarse},
    ]
    return {"name": "grocery", "heads": heads, "items": items, "leaf": "fine", "parent_of": fine_to_coarse}


def clothing() -> dict:
    root = DATA / "clothing-small"
    items = []
    for split_dir, split in (("train", "train"), ("validation", "val")):
        for cls_dir in sorted((root / split_dir).iterdir()):
            for p in sorted(cls_dir.glob("*.jpg")):
                items.append({"path": str(p), "labels": {"item": cls_dir.name}, "split": split})
    classes = sorted({it["labels"]["item"] for it in items})
    return {
        "name": "clothing",
        "heads": [{"name": "item", "classes": classes, "parent": None}],
        "items": items,
        "leaf": "item",
        "parent_of": None,
    }


def manifest_of(ds: dict) -> dict:
    items = [{**it, "id": i, "group": f"g{i}", "source": "real"} for i, it in enumerate(ds["items"])]
    return {"heads": ds["heads"], "items": items}


def engine_config(n_train: int, **extra) -> dict:
    epochs = max(2, int(BUDGET * EST_IMAGES_PER_S / n_train))
    return {
        "backbone": BACKBONE,
        "pretrained": False,
        "image_size": SIZE,
        "batch_size": BATCH,
        "epochs": epochs,
        "max_train_seconds": BUDGET,
        "eval_report": True,
        **extra,
    }


# --------------------------------------------------------------------------------------------- baseline
class Plain(Dataset):
    def __init__(self, paths, labels, tf):
        self.paths, self.labels, self.tf = paths, labels, tf

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.tf(img.convert("RGB")), self.labels[i]


def baseline_transforms(size: int = SIZE) -> tuple[T.Compose, T.Compose]:
    """The plain loop's (train, val) transforms: torchvision RandomResizedCrop + flip / resize + centre crop."""
    train_tf = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    val_tf = T.Compose(
        [
            T.Resize(int(size * 1.14), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    return train_tf, val_tf


def baseline(ds: dict) -> dict:
    leaf = ds["leaf"]
    classes = next(h["classes"] for h in ds["heads"] if h["name"] == leaf)
    idx = {c: i for i, c in enumerate(classes)}
    train = [it for it in ds["items"] if it["split"] == "train"]
    val = [it for it in ds["items"] if it["split"] == "val"]
    train_tf, val_tf = baseline_transforms()
    workers = resolve_num_workers("auto")
    torch.set_num_threads(resolve_torch_threads("auto", workers))
    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(
        Plain([it["path"] for it in train], [idx[it["labels"][leaf]] for it in train], train_tf),
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
    )
    val_loader = DataLoader(
        Plain([it["path"] for it in val], [idx[it["labels"][leaf]] for it in val], val_tf),
        batch_size=64,
        num_workers=workers,
    )
    best, t_train, epochs = None, 0.0, 0
    while t_train < BUDGET:
        t0 = time.monotonic()
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if t_train + time.monotonic() - t0 >= BUDGET:
                break
        t_train += time.monotonic() - t0
        epochs += 1
        model.eval()
        preds, ys = [], []
        with torch.inference_mode():
            for x, y in val_loader:
                preds.append(model(x).argmax(1).numpy())
                ys.append(y.numpy())
        pred, y = np.concatenate(preds), np.concatenate(ys)
        top1 = float((pred == y).mean())
        coarse = None
        if ds["parent_of"]:
            p = ds["parent_of"]
            coarse = float(np.mean([p[classes[a]] == p[classes[b]] for a, b in zip(pred, y, strict=True)]))
        if best is None or top1 > best["top1"]:
            best = {"top1": top1, "coarse_top1": coarse, "epoch": epochs}
    best["epochs"] = epochs
    best["train_seconds"] = round(t_train, 1)
    return best


def main() -> None:
    if not DATA.is_dir():
        sys.exit(f"{DATA} is missing: this benchmark needs ../shared/datasets (grocery-store, clothing-small).")
    metrics = {}
    notes = [f"budget {BUDGET:.0f} s of training per arm; {BACKBONE} random init, {SIZE} px, batch {BATCH}, CPU."]
    for ds in (grocery(), clothing()):
        name, leaf = ds["name"], ds["leaf"]
        n_train = sum(1 for it in ds["items"] if it["split"] == "train")
        print(f"[{name}] baseline …", flush=True)
        base = baseline(ds)
        print(f"[{name}] ours, multi-head softmax …", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            soft = train_model(manifest_of(ds), engine_config(n_train), Path(tmp) / "softmax")
        print(f"[{name}] ours, ArcFace …", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            arc = train_model(
                manifest_of(ds),
                engine_config(n_train, head_type="arcface", arcface_margin=20.0, arcface_scale=30.0),
                Path(tmp) / "arcface",
            )
        soft_top1 = soft["heads"][leaf]["top1"]
        arc_r1 = arc["retrieval"][leaf]["recall@1"]
        metrics[f"{name}_{leaf}_top1_softmax"] = metric(
            soft_top1,
            "top-1",
            f"plain single-head loop, same budget ({leaf})",
            base["top1"],
            target="our best > baseline",
            met=max(soft_top1, arc_r1) > base["top1"],
        )
        metrics[f"{name}_{leaf}_recall1_arcface"] = metric(
            arc_r1, "Recall@1", f"plain single-head loop top-1 ({leaf})", base["top1"]
        )
        metrics[f"{name}_{leaf}_top1_arcface_head"] = metric(
            arc["heads"][leaf]["top1"], "top-1", f"plain single-head loop ({leaf})", base["top1"]
        )
        if ds["parent_of"]:
            metrics[f"{name}_coarse_top1_softmax"] = metric(
                soft["heads"]["coarse"]["top1"],
                "top-1",
                "plain loop: parent of its fine prediction",
                base["coarse_top1"],
            )
        notes.append(
            f"{name}: baseline best epoch {base['epoch']} of {base['epochs']} in {base['train_seconds']} s; "
            f"softmax {soft['epochs_run']} epochs (best {soft['best_epoch']}), arcface {arc['epochs_run']} epochs "
            f"(best {arc['best_epoch']}); softmax Recall@1 {soft['retrieval'][leaf]['recall@1']:.3f}."
        )
        print(table(metrics), flush=True)
    path = write("train_accuracy", metrics, notes=" ".join(notes))
    print(table(metrics))
    print(f"written {path}")


if __name__ == "__main__":
    main()
