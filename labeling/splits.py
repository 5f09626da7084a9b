"""Train/val/test split assignment for groups of images.

Two tools live here:

* `split_for_group` — a stable hash split of one group key: a group never crosses splits and keeps its split as
  data is added (the hash does not depend on the other groups), but label proportions are only right on average.
* `assign_splits` — group-aware, stratified, sticky assignment of a whole set of groups (pure Python, no Django).
  A group (images sharing one key: one physical object / ID) is the unit, so it never crosses splits. Groups listed
  in `previous` keep their split forever; only new groups are placed, so as to keep each label's *images* split as
  close to the ratios as possible.
"""

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DEFAULT_RATIOS = (0.70, 0.15, 0.15)
SPLITS = ("train", "val", "test")

_TRAIN, _VAL, _TEST = 0, 1, 2


def split_for_group(group_key: str, *, ratios: tuple[float, float, float] = DEFAULT_RATIOS, salt: str = "") -> str:
    digest = hashlib.sha256(f"{salt}:{group_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "val"
    return "test"


@dataclass(frozen=True)
class GroupInfo:
    """One group of images that must stay together in one split."""

    key: str  # the group key (images sharing it are one physical object / ID and never cross splits)
    n_images: int  # images in the group (>= 1)
    label: str | None  # stratification label of the group (e.g. its leaf class "Toyota/Corolla"); None = unlabeled
    eval_ok: bool = True  # False: the group may only go to train (e.g. a LEGO group with no `real` images)


def _check_ratios(ratios) -> tuple[float, float, float]:
    try:
        values = tuple(float(r) for r in ratios)
    except (TypeError, ValueError):
        raise ValueError(f"ratios must be 3 numbers (train, val, test), got {ratios!r}") from None
    if len(values) != 3:
        raise ValueError(f"ratios must be 3 numbers (train, val, test), got {len(values)}: {ratios!r}")
    if not all(math.isfinite(r) and r >= 0 for r in values):
        raise ValueError(f"ratios must be finite and non-negative, got {ratios!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"ratios must sum to 1 (±1e-6), got {ratios!r} (sum {sum(values)!r})")
    if values[_TRAIN] <= 0:
        raise ValueError(f"the train ratio must be > 0, got {ratios!r}")
    return values  # type: ignore[return-value]


def assign_splits(
    groups: Iterable[GroupInfo],
    *,
    previous: Mapping[str, str] | None = None,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    seed: str = "",
) -> dict[str, str]:
    """Return {group key: "train" | "val" | "test"} for every group in `groups`.

    Rules, in order of strength:

    1. One split per group (by construction). Duplicate keys, bad ratios (not 3 finite non-negative numbers summing
       to 1 ± 1e-6 with train > 0), `n_images` < 1 and values of `previous` that are not one of `SPLITS` (any entry,
       present in `groups` or not) raise ValueError.
    2. Sticky: a group present in `previous` keeps that split, always — even if it is now `eval_ok=False`; the caller
       must then leave that group's non-real images out of val/test itself. Keys of `previous` absent from `groups`
       are ignored (they do not count toward anything).
    3. New `eval_ok=False` groups go to train. Other new groups are placed per stratum (label; the unlabeled groups,
       label None, form one stratum of their own), largest first (ties: a hash of seed + key), each into the split
       with the largest image deficit (target − assigned images, stickies included) for its stratum, among splits
       with a ratio > 0. Ties go to the split with the largest overall deficit, then train, val, test. Few-group
       strata favour train: a group goes to train while the stratum has no group in train (every class can be
       learned); the stratum's last new group goes to val/test (largest deficit) if the stratum would otherwise have
       train but nothing in val/test, so a label with 2 groups ends up as train + val or train + test.
    4. With many small groups per label, each label's and the overall image shares end up within about one group
       size of the ratios. Labels with one or two groups are dominated by rule 3 (1 → train, 2 → train + eval).
    5. Deterministic: the result depends on the set of groups, `previous`, `ratios` and `seed` — not on input order.
    """
    ratio = _check_ratios(ratios)
    previous = {} if previous is None else previous
    split_index = {name: i for i, name in enumerate(SPLITS)}
    for key, split in previous.items():
        if split not in split_index:
            raise ValueError(f"previous split of group {key!r} is {split!r}; expected one of {SPLITS}")

    result: dict[str, str] = {}
    strata: dict[str | None, list[GroupInfo]] = {}
    grand_total = 0
    global_assigned = [0, 0, 0]
    for group in groups:
        key = group.key
        if key in result:
            raise ValueError(f"duplicate group key {key!r}: each group must be given once")
        n = group.n_images
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"group {key!r} has n_images={n!r}; it must be an int >= 1")
        grand_total += n
        old = previous.get(key)
        if old is not None:
            global_assigned[split_index[old]] += n
        result[key] = old  # type: ignore[assignment]  # None for new groups, filled in below
        strata.setdefault(group.label, []).append(group)

    global_target = [grand_total * r for r in ratio]
    active = [i for i in (_TRAIN, _VAL, _TEST) if ratio[i] > 0]
    eval_active = [i for i in (_VAL, _TEST) if ratio[i] > 0]
    seed_prefix = f"{seed}\x00".encode()

    def order(group: GroupInfo):
        digest = hashlib.blake2b(seed_prefix + group.key.encode(), digest_size=8).digest()
        return (-group.n_images, digest, group.key)

    # Strata in a fixed order (named labels sorted, unlabeled last): the overall tie-breaks depend on it.
    for label in sorted(strata, key=lambda lab: (lab is None, lab or "")):
        members = strata[label]
        total = 0
        assigned = [0, 0, 0]
        n_groups = [0, 0, 0]
        free: list[GroupInfo] = []
        forced: list[GroupInfo] = []
        for group in members:
            total += group.n_images
            old = result[group.key]
            if old is not None:
                i = split_index[old]
                assigned[i] += group.n_images
                n_groups[i] += 1
            elif group.eval_ok:
                free.append(group)
            else:
                forced.append(group)
        for group in forced:
            result[group.key] = "train"
            assigned[_TRAIN] += group.n_images
            n_groups[_TRAIN] += 1
            global_assigned[_TRAIN] += group.n_images
        if not free:
            continue
        target = [total * r for r in ratio]
        free.sort(key=order)
        last = len(free) - 1
        for pos, group in enumerate(free):
            if n_groups[_TRAIN] == 0:
                best = _TRAIN
            else:
                candidates = (
                    eval_active if pos == last and eval_active and n_groups[_VAL] + n_groups[_TEST] == 0 else active
                )
                best = candidates[0]
                best_score = (target[best] - assigned[best], global_target[best] - global_assigned[best])
                for i in candidates[1:]:
                    score = (target[i] - assigned[i], global_target[i] - global_assigned[i])
                    if score > best_score:
                        best, best_score = i, score
            n = group.n_images
            result[group.key] = SPLITS[best]
            assigned[best] += n
            n_groups[best] += 1
            global_assigned[best] += n
    return result
