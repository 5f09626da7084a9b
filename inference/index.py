"""The Faiss gallery index of a model version (pure Python, no Django): the index kind for a gallery size, IVF
nprobe tuning to a recall target, building index.faiss + gallery_ids.npy + index.json atomically, and reading
index.json back.

Public API::

    choose_index_kind(n, kind="auto", *, flat_max=FLAT_MAX) -> "flat" | "hnsw" | "ivf"
    tune_nprobe(index, emb, ids=None, *, k=20, target=RECALL_TARGET) -> (nprobe, recall)
    build_index(artifact_dir, embeddings, ids, *, kind="auto", flat_max=FLAT_MAX) -> Path
    read_index_meta(artifact_dir) -> dict | None
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np

from training.engine.artifact import IDS_FILE, INDEX_FILE, INDEX_META_FILE, read_artifact_json
from training.engine.atomic import write_atomic, write_json_atomic

FLAT_MAX = 50_000  # exact search below this gallery size; approximate (IVF, tuned nprobe) above
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
RECALL_TARGET = 0.95  # approximate indexes are tuned to find >= 95 % of the exact 20 nearest neighbours


def choose_index_kind(n: int, kind: str = "auto", *, flat_max: int = FLAT_MAX) -> str:
    """ "flat" (exact) for galleries below flat_max vectors, "ivf" above: inverted lists whose nprobe is tuned
    at build time to the recall target; it builds 1M x 512-d in about a minute on 2 cores where HNSW takes
    ~10x longer (bench/faiss_index.py). An explicit kind is kept ("hnsw": no training, on request)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    return "flat" if n < flat_max else "ivf"


def _make_index(emb: np.ndarray, kind: str):
    d = emb.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 200
        inner.hnsw.efSearch = 128
        return inner
    nlist = max(1, min(int(4 * np.sqrt(len(emb))), len(emb) // 39 or 1))  # faiss wants >= 39 points per list
    quantizer = faiss.IndexFlatIP(d)
    inner = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = emb[rng.choice(len(emb), size=min(len(emb), nlist * 64), replace=False)]
    inner.train(sample)
    inner.nprobe = min(nlist, 8)
    return inner


def tune_nprobe(
    index,
    emb: np.ndarray,
    ids: np.ndarray | None = None,
    *,
    k: int = 20,
    target: float = RECALL_TARGET,
    n_queries: int = 256,
    seed: int = 0,
) -> tuple[int, float]:
    """Set the smallest nprobe (1, 2, 4, ... nlist) of an IVF index (or an IndexIDMap2 over one) whose recall@k
    on gallery vectors used as queries, each query's own vector left out, reaches `target` against exact
    search. `emb` are the indexed vectors and `ids` their ids in the index (default 0..n-1). Returns
    (nprobe, recall at that nprobe)."""
    ivf = faiss.extract_index_ivf(index)
    n = len(emb)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    rng = np.random.default_rng(seed)
    qi = rng.choice(n, size=min(n, n_queries), replace=False)
    q = np.ascontiguousarray(emb[qi])
    kk = min(k + 1, n)
    _, exact = faiss.knn(q, emb, kk, metric=faiss.METRIC_INNER_PRODUCT)
    own = ids[qi]
    truth = []  # per query: its k exact nearest neighbours besides its own vector
    for row, o in zip(exact, own, strict=True):
        ranked = [int(j) for j in ids[row[row >= 0]] if j != o]
        truth.append(set(ranked[:k]))
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(q, kk)
        hits = [len(t & set(row.tolist())) / len(t) for t, row in zip(truth, found, strict=True) if t]
        recall = float(np.mean(hits)) if hits else 1.0
        if recall >= target or nprobe >= ivf.nlist:
            return nprobe, recall
        nprobe = min(ivf.nlist, nprobe * 2)


def build_index(
    artifact_dir, embeddings: np.ndarray, ids: np.ndarray, *, kind: str = "auto", flat_max: int = FLAT_MAX
) -> Path:
    """Write artifact_dir/index.faiss (an IndexIDMap2 — vector ids are database ids — over an inner-product
    index on L2-normalised vectors, i.e. cosine similarity; vectors are renormalised here) and gallery_ids.npy,
    each via a temp file + os.replace, so a loaded index is never half-written. The inner index is exact (flat)
    below `flat_max` vectors and HNSW above (`kind` overrides: "flat", "hnsw", "ivf"). Returns the index path.
    An empty gallery gives an empty (valid) index."""
    d = Path(artifact_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"artifact folder {d} does not exist")
    emb = np.asarray(embeddings, dtype=np.float32)
    ids = np.asarray(ids)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, D), got shape {emb.shape}")
    if ids.ndim != 1 or len(ids) != emb.shape[0]:
        raise ValueError(f"ids must be a 1-D array with one id per embedding ({emb.shape[0]}), got {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or infinite values")
    emb = np.ascontiguousarray(emb.copy())
    ids = np.ascontiguousarray(ids.astype(np.int64))
    if len(emb):
        faiss.normalize_L2(emb)
    chosen = choose_index_kind(len(emb), kind, flat_max=flat_max) if len(emb) else "flat"
    started = time.perf_counter()
    index = faiss.IndexIDMap2(_make_index(emb, chosen))
    meta: dict = {"kind": chosen, "size": len(emb), "dim": int(emb.shape[1])}
    if len(emb):
        index.add_with_ids(emb, ids)
    if chosen == "ivf" and len(emb):
        nprobe, recall = tune_nprobe(index, emb, ids)
        meta |= {"nlist": int(faiss.extract_index_ivf(index).nlist), "nprobe": nprobe, "recall_at_20": recall}
    meta["build_seconds"] = round(time.perf_counter() - started, 2)
    index_path = d / INDEX_FILE

    def write_ids(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, ids)

    write_atomic(d / IDS_FILE, write_ids)
    write_atomic(index_path, lambda tmp: faiss.write_index(index, str(tmp)))
    write_json_atomic(d / INDEX_META_FILE, meta, indent=2)
    return index_path


def read_index_meta(artifact_dir) -> dict | None:
    """index.json written by build_index: kind, size, dim, build_seconds (+ nlist, nprobe, recall_at_20 for IVF)."""
    return read_artifact_json(artifact_dir, INDEX_META_FILE)
