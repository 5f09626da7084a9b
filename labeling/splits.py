"""Group-aware split by a stable hash of the group key: a group never crosses splits and keeps its split as
data is added (the hash does not depend on the other groups). The dataset-versions work replaces this with
stratified, frozen splits."""

import hashlib

DEFAULT_RATIOS = (0.70, 0.15, 0.15)


def split_for_group(group_key: str, *, ratios: tuple[float, float, float] = DEFAULT_RATIOS, salt: str = "") -> str:
    digest = hashlib.sha256(f"{salt}:{group_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "val"
    return "test"
