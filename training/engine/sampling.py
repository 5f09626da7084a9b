"""Train-set samplers: class-balanced P x K batches and per-source weighted sampling (with a curriculum).

Config keys (SAMPLING_DEFAULTS; merged into the training config by config.py, checked by
validate_sampling_config):

    sampler            "shuffle" (default: plain shuffled epochs) | "pk" | "weighted"
    pk_p, pk_k         P classes x K images per batch for sampler "pk" (batch size = P*K; batch_size is ignored)
    source_weights     {source: share} for sampler "weighted", e.g. {"real": 0.7, "synthetic": 0.3}
    source_curriculum  [{"until_epoch": 5, "weights": {...}}, ..., {"weights": {...}}] for sampler "weighted"

Shares are the fraction of each source in the *sampled stream*, not per-item weights: {"real": 0.7,
"synthetic": 0.3} draws ~70% real images whatever the real/synthetic counts. Sources missing from the mapping
are never drawn. Epochs are numbered like the training loop (1, 2, ...): a curriculum stage applies to the
epochs <= its until_epoch; the last stage has no until_epoch and applies to all later epochs.

How the loop uses it::

    sampler, kind = build_train_sampler(sources, first_head_targets, cfg, seed=cfg["seed"])
    if kind == "pk":         DataLoader(ds, batch_sampler=sampler, ...)      # no batch_size/shuffle/drop_last
    elif kind == "weighted": DataLoader(ds, sampler=sampler, batch_size=bs, drop_last=..., ...)
    else:                    DataLoader(ds, batch_size=bs, shuffle=True, ...)  # sampler is None
    for epoch in range(1, epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)     # BEFORE iterating the loader: the epoch's order is f(seed, epoch)
        for batch in loader: ...

Every sampler's order depends only on (seed, epoch), so resuming at epoch e after set_epoch(e) reproduces the
same batches. set_epoch is called in the main process, which is where DataLoader iterates samplers, so it also
works with persistent workers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from torch.utils.data import Sampler

from .manifest import IGNORE_INDEX

log = logging.getLogger("training.engine")

SOURCES = ("real", "synthetic", "legacy", "production")  # labeling.models.Image.source choices
DEFAULT_SOURCE = "real"  # for manifest items without a "source"
SAMPLERS = ("shuffle", "pk", "weighted")
SAMPLING_DEFAULTS: dict = {
    "sampler": "shuffle",
    "pk_p": 8,
    "pk_k": 4,
    "source_weights": None,
    "source_curriculum": None,
}


def _rng(seed: int, epoch: int) -> np.random.Generator:
    """A generator that is a pure function of (seed, epoch); negative values are fine."""
    mask = (1 << 64) - 1
    return np.random.default_rng([int(seed) & mask, int(epoch) & mask, 0x5A4D])


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_intlike(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


# ---------------------------------------------------------------------------------------------- P x K batches


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P distinct classes x K indices per class, from `labels` (one int per dataset item).

    Rows labelled IGNORE_INDEX are never sampled. Classes are visited in shuffled rounds (every class appears
    about equally often); within a class, indices are drawn without replacement until the class is exhausted,
    then reshuffled; a class with fewer than K images is sampled with replacement (duplicates in its slot).
    With fewer than P classes, P is reduced to the number of classes (warning). `epoch_length` batches per
    epoch (default: about n_labelled / (P*K), at least 1). The order is a pure function of (seed, epoch): call
    set_epoch(epoch) before each epoch."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        *,
        epoch_length: int | None = None,
        seed: int = 0,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"PKBatchSampler: labels must be 1-D (one label per item), got shape {labels.shape}")
        if not (_is_intlike(p) and p >= 1):
            raise ValueError(f"PKBatchSampler: P (pk_p) must be an integer >= 1, got {p!r}")
        if not (_is_intlike(k) and k >= 1):
            raise ValueError(f"PKBatchSampler: K (pk_k) must be an integer >= 1, got {k!r}")
        labelled = np.flatnonzero(labels != IGNORE_INDEX)
        if labelled.size == 0:
            raise ValueError("PKBatchSampler: no labelled item (every label is IGNORE_INDEX)")
        classes, inverse = np.unique(labels[labelled], return_inverse=True)
        self.class_indices: list[np.ndarray] = [labelled[inverse == c] for c in range(len(classes))]
        self.classes = classes
        p, k = int(p), int(k)
        if p > len(classes):
            log.warning("pk sampler: P=%d but only %d labelled classes: using P=%d", p, len(classes), len(classes))
            p = len(classes)
        self.p, self.k = p, k
        self.n_labelled = int(labelled.size)
        if epoch_length is None:
            epoch_length = max(1, round(self.n_labelled / (p * k)))
        if not (_is_intlike(epoch_length) and epoch_length >= 1):
            raise ValueError(f"PKBatchSampler: epoch_length must be an integer >= 1, got {epoch_length!r}")
        self.epoch_length = int(epoch_length)
        self.seed = int(seed)
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self):
        rng = _rng(self.seed, self.epoch)
        n_classes = len(self.class_indices)
        p, k = self.p, self.k
        queue: list[int] = []
        pools: list[list[int]] = [[] for _ in range(n_classes)]
        for _ in range(self.epoch_length):
            if len(queue) >= p:
                chosen, queue = queue[:p], queue[p:]
            else:  # finish this round, then start a new one with the just-chosen classes moved to its end
                chosen = queue
                taken = set(chosen)
                perm = [int(c) for c in rng.permutation(n_classes)]
                perm = [c for c in perm if c not in taken] + [c for c in perm if c in taken]
                need = p - len(chosen)
                chosen, queue = chosen + perm[:need], perm[need:]
            batch: list[int] = []
            for c in chosen:
                idx = self.class_indices[c]
                if idx.size < k:
                    batch.extend(int(i) for i in rng.choice(idx, size=k, replace=True))
                    continue
                pool = pools[c]
                if len(pool) < k:  # refill: the leftovers first, then a fresh permutation without them
                    left = set(pool)
                    pool.extend(int(i) for i in rng.permutation(idx) if int(i) not in left)
                batch.extend(pool[:k])
                del pool[:k]
            yield batch


# ------------------------------------------------------------------------------------ source shares / weights


def _check_shares(weights, where: str) -> dict[str, float]:
    if not isinstance(weights, dict) or not weights:
        raise ValueError(
            f"{where}: expected a non-empty {{source: share}} dict such as {{'real': 0.7, 'synthetic': 0.3}}, "
            f"got {weights!r}"
        )
    unknown = sorted(str(s) for s in weights if s not in SOURCES)
    if unknown:
        raise ValueError(f"{where}: unknown source(s) {unknown}; sources are {list(SOURCES)}")
    bad = {s: v for s, v in weights.items() if not (_is_num(v) and v >= 0)}
    if bad:
        raise ValueError(f"{where}: shares must be numbers >= 0, got {bad!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{where}: at least one share must be > 0, got {weights!r}")
    return {s: float(v) for s, v in weights.items()}


def source_weights(sources: Sequence[str | None], weights: dict[str, float]) -> np.ndarray:
    """Per-item sampling weights (float64, sum 1) such that each source's share of the drawn stream is
    weights[source] / sum(weights) (shares, not per-item weights: an item's weight is its source's share
    divided by the number of items of that source). A None source counts as DEFAULT_SOURCE ("real").

    Sources not in `weights` get weight 0. Shares of sources with no item are dropped and the rest
    renormalised (warning). ValueError when no item can be drawn, or on bad shares."""
    shares = _check_shares(weights, "source_weights")
    src = np.array([DEFAULT_SOURCE if s is None else str(s) for s in sources], dtype=object)
    if src.size == 0:
        raise ValueError("source_weights: no items to weight")
    present, counts = np.unique(src, return_counts=True)
    count = dict(zip(present.tolist(), counts.tolist(), strict=True))
    absent = sorted(s for s, v in shares.items() if v > 0 and s not in count)
    if absent:
        log.warning("source weights: no train item of source(s) %s: their share is redistributed", absent)
    usable = {s: v for s, v in shares.items() if v > 0 and s in count}
    if not usable:
        raise ValueError(
            f"source_weights: no train item can be drawn: the train items' sources are {count} but the shares "
            f"{shares} give them all weight 0 (sources missing from the mapping are never drawn)"
        )
    per_item = {s: v / count[s] for s, v in usable.items()}
    w = np.array([per_item.get(s, 0.0) for s in src], dtype=np.float64)
    return w / w.sum()


def validate_curriculum(schedule, where: str = "source_curriculum") -> None:
    """ValueError (naming the stage) unless `schedule` is a non-empty list of stages {"until_epoch": int,
    "weights": {source: share}} with strictly increasing until_epoch, the last stage without until_epoch."""
    if not isinstance(schedule, list) or not schedule:
        raise ValueError(
            f"{where}: expected a non-empty list of stages such as [{{'until_epoch': 5, 'weights': "
            f"{{'synthetic': 0.8, 'real': 0.2}}}}, {{'weights': {{'real': 0.7, 'synthetic': 0.3}}}}], got {schedule!r}"
        )
    prev = 0
    for i, stage in enumerate(schedule):
        ref = f"{where} stage #{i}"
        if not isinstance(stage, dict):
            raise ValueError(f"{ref}: expected a dict with 'weights' (and 'until_epoch'), got {stage!r}")
        extra = sorted(set(stage) - {"until_epoch", "weights"})
        if extra:
            raise ValueError(f"{ref}: unknown key(s) {extra}; a stage has 'until_epoch' and 'weights'")
        if "weights" not in stage:
            raise ValueError(f"{ref}: missing 'weights' ({{source: share}})")
        _check_shares(stage["weights"], f"{ref} 'weights'")
        last = i == len(schedule) - 1
        until = stage.get("until_epoch")
        if last:
            if until is not None:
                raise ValueError(
                    f"{ref}: the last stage must have no 'until_epoch' (it applies to all remaining epochs)"
                )
            continue
        if until is None:
            raise ValueError(f"{ref}: missing 'until_epoch' (only the last stage may omit it)")
        if not (_is_intlike(until) and until >= 1):
            raise ValueError(f"{ref}: 'until_epoch' must be an integer >= 1 (epochs count from 1), got {until!r}")
        if until <= prev:
            raise ValueError(f"{ref}: 'until_epoch' {until} must be greater than the previous stage's ({prev})")
        prev = int(until)


def curriculum_stage(schedule: list[dict], epoch: int) -> dict[str, float]:
    """The shares of the stage that applies to `epoch` (1-based; the first stage with epoch <= until_epoch)."""
    validate_curriculum(schedule)
    for stage in schedule[:-1]:
        if epoch <= stage["until_epoch"]:
            return stage["weights"]
    return schedule[-1]["weights"]


def curriculum_weights(sources: Sequence[str | None], schedule: list[dict], epoch: int) -> np.ndarray:
    """Per-item weights (sum 1) for `epoch` under the curriculum `schedule` (see curriculum_stage and
    source_weights)."""
    return source_weights(sources, curriculum_stage(schedule, epoch))


class EpochWeightedSampler(Sampler[int]):
    """Draw `num_samples` indices with replacement from per-item weights, which may change with the epoch:
    `weights` is an array (fixed) or a function epoch -> array. The draw is a pure function of (seed, epoch):
    call set_epoch(epoch) before each epoch."""

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray | Callable[[int], np.ndarray],
        num_samples: int,
        *,
        seed: int = 0,
    ):
        if not (_is_intlike(num_samples) and num_samples >= 1):
            raise ValueError(f"EpochWeightedSampler: num_samples must be an integer >= 1, got {num_samples!r}")
        if callable(weights):
            self._weights_fn = weights
        else:
            fixed = np.asarray(weights, dtype=np.float64)
            self._weights_fn = lambda _epoch: fixed
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def weights(self, epoch: int | None = None) -> np.ndarray:
        """The normalised weights for `epoch` (default: the current one). ValueError if unusable."""
        w = np.asarray(self._weights_fn(self.epoch if epoch is None else epoch), dtype=np.float64)
        if w.ndim != 1 or w.size == 0:
            raise ValueError(f"EpochWeightedSampler: weights must be a non-empty 1-D array, got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("EpochWeightedSampler: weights must be finite, >= 0 and not all 0")
        return w / w.sum()

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        p = self.weights()
        draws = _rng(self.seed, self.epoch).choice(p.size, size=self.num_samples, replace=True, p=p)
        return iter(draws.tolist())


# ------------------------------------------------------------------------------------------ config and factory


def validate_sampling_config(cfg: dict) -> None:
    """Check the sampling keys of `cfg` (missing keys take SAMPLING_DEFAULTS); ValueError names the key."""

    def get(key):
        return cfg.get(key, SAMPLING_DEFAULTS[key])

    sampler = get("sampler")
    if sampler not in SAMPLERS:
        raise ValueError(f"config 'sampler': expected one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")
    for key in ("pk_p", "pk_k"):
        v = get(key)
        if not (_is_intlike(v) and 1 <= v <= 4096):
            raise ValueError(f"config {key!r}: expected an integer between 1 and 4096, got {v!r}")
    if _is_intlike(get("pk_p")) and get("pk_p") * get("pk_k") > 4096:
        raise ValueError(f"config 'pk_p' x 'pk_k' (the batch size) must be <= 4096, got {get('pk_p') * get('pk_k')}")
    sw, sc = get("source_weights"), get("source_curriculum")
    if sw is not None:
        _check_shares(sw, "config 'source_weights'")
    if sc is not None:
        validate_curriculum(sc, "config 'source_curriculum'")
    if sw is not None and sc is not None:
        raise ValueError(
            "config 'source_weights' and 'source_curriculum' are both set: use one (a curriculum with a single "
            "stage is the same as fixed source_weights)"
        )
    if sampler == "weighted" and sw is None and sc is None:
        raise ValueError("config 'sampler': 'weighted' needs 'source_weights' or 'source_curriculum'")
    if sampler != "weighted" and (sw is not None or sc is not None):
        key = "source_weights" if sw is not None else "source_curriculum"
        raise ValueError(f"config {key!r} only applies with sampler 'weighted' (sampler is {sampler!r})")


def manifest_train_sources(manifest: dict) -> list[str]:
    """The "source" of each train item of `manifest`, in the order of parse_manifest(manifest).train (items
    without a source count as DEFAULT_SOURCE). For the loop, since manifest.Item does not carry the source."""
    return [
        str(it.get("source") or DEFAULT_SOURCE)
        for it in manifest.get("items", [])
        if isinstance(it, dict) and it.get("split") == "train"
    ]


def build_train_sampler(
    items_sources: Sequence[str | None],
    targets_first_head: Sequence[int] | np.ndarray,
    cfg: dict,
    *,
    seed: int,
) -> tuple[PKBatchSampler | EpochWeightedSampler | None, str]:
    """(sampler, kind) for the train loader from the cfg keys of SAMPLING_DEFAULTS (validated here):

    - "shuffle": (None, "shuffle") - keep DataLoader(shuffle=True).
    - "pk": (PKBatchSampler, "pk") on the first head's labels (items unknown for that head are never drawn) -
      pass it as DataLoader(batch_sampler=...); the batch size is pk_p * pk_k.
    - "weighted": (EpochWeightedSampler, "weighted") drawing len(items) indices per epoch with replacement,
      from source_weights or, per epoch, source_curriculum - pass it as DataLoader(sampler=..., batch_size=...).

    The loop must call sampler.set_epoch(epoch) (1-based epoch, as in the loop) before iterating each epoch."""
    validate_sampling_config(cfg)
    kind = cfg.get("sampler", SAMPLING_DEFAULTS["sampler"])
    if kind == "shuffle":
        return None, kind
    if kind == "pk":
        p = int(cfg.get("pk_p", SAMPLING_DEFAULTS["pk_p"]))
        k = int(cfg.get("pk_k", SAMPLING_DEFAULTS["pk_k"]))
        return PKBatchSampler(np.asarray(targets_first_head), p, k, seed=seed), kind
    sources = list(items_sources)
    if len(sources) != len(targets_first_head):
        raise ValueError(
            f"build_train_sampler: {len(sources)} sources for {len(targets_first_head)} train items (misaligned)"
        )
    sw = cfg.get("source_weights")
    if sw is not None:
        fixed = source_weights(sources, sw)
        return EpochWeightedSampler(fixed, len(sources), seed=seed), kind
    schedule = cfg["source_curriculum"]
    per_stage = [source_weights(sources, stage["weights"]) for stage in schedule]  # fails now, not mid-training
    ends = [stage["until_epoch"] for stage in schedule[:-1]]

    def weights_for(epoch: int) -> np.ndarray:
        return per_stage[next((i for i, end in enumerate(ends) if epoch <= end), len(ends))]

    return EpochWeightedSampler(weights_for, len(sources), seed=seed), kind
