"""Dataset health scan (labeling/health_core.py) on real photos: the grocery-store train set (2,640 JPEGs, mostly
348x348), read in place from /work/shared/datasets/grocery-store (or $LOUPE_GROCERY_DIR), never copied.

1. Scan throughput: check_files (validation + phash + central-crop phash) on every train file, with the process
   pool and with workers=1, against the plain baseline "PIL full decode + imagehash.phash" in one process on the
   same files. The page cache is warmed first (every file read once) so all three see the same I/O; best of 3.
2. Search: near_duplicate_pairs / find_near_duplicates over 100,000 realistic hashes, against an all-pairs
   numpy popcount on a 10,000-hash sample extrapolated quadratically (x100) to 100,000.
3. Quality: planted near-duplicates of a seeded sample of 300 photos (temp dir): JPEG quality 60, 50% resize, 5%
   cut from every border, brightness +10% and -10%, and all of crop+brightness+resize+q60 combined. Recall of the
   planted pairs and the share of reported pairs that are false, over originals + all train photos + variants.
Run: `make bench-health` (writes bench/results/health.json)."""

import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import imagehash  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

from bench.common import metric, table, write  # noqa: E402
from labeling import health_core as hc  # noqa: E402

DATA = Path(os.environ.get("LOUPE_GROCERY_DIR", ROOT.parent / "shared" / "datasets" / "grocery-store"))
SAMPLE = 300
SEED = 7
N_SEARCH = 100_000
N_BRUTE = 10_000
RADII = range(0, 17, 2)  # phash has exactly 32 ones (median threshold): distances are even
KINDS = ("q60", "half", "crop5", "bright+10", "bright-10", "combined")
DIAGNOSTIC = ("crop5_topleft",)  # not a target: a one-sided 5% crop shifts the content (see notes)
# Pairs of different train photos that stage 1 reports, looked at side by side (montages of ~30 of them,
# distance 0-8, Royal-Gala_023/_025 at distance 0 included): all consecutive shots of the same item from the
# same spot, none the same photo (pixel differences everywhere; the item turned or moved). They count as false.
INSPECTED = ("Fruit/Apple/Royal-Gala/Royal-Gala_023.jpg", "Fruit/Apple/Royal-Gala/Royal-Gala_025.jpg")


def best_of(fn, repeat=3):
    times = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def baseline_scan(paths):
    hashes = []
    for p in paths:
        with Image.open(p) as img:
            img.load()
            hashes.append(imagehash.phash(img))
    return hashes


def make_variants(files, sample, out: Path):
    """(path, source index, kind) for each planted copy."""
    rows = []
    for k in sample:
        with Image.open(files[k]) as src:
            img = src.convert("RGB")
        w, h = img.size
        dx, dy = round(w * 0.05), round(h * 0.05)
        crop = img.crop((dx, dy, w - dx, h - dy))
        comb = ImageEnhance.Brightness(crop).enhance(1.1)
        variants = {
            "q60": (img, 60),
            "half": (img.resize((w // 2, h // 2), Image.Resampling.LANCZOS), 90),
            "crop5": (crop, 90),
            "bright+10": (ImageEnhance.Brightness(img).enhance(1.1), 90),
            "bright-10": (ImageEnhance.Brightness(img).enhance(0.9), 90),
            "combined": (comb.resize((comb.width // 2, comb.height // 2), Image.Resampling.LANCZOS), 60),
            "crop5_topleft": (img.crop((dx, dy, w, h)), 90),
        }
        for kind, (im, quality) in variants.items():
            path = out / f"{k:05d}_{kind}.jpg"
            im.save(path, quality=quality)
            rows.append((str(path), k, kind))
    return rows


def realistic_hashes(full, center, n, rng):
    """n (phash, center) pairs shaped like real ones: the measured hashes first, then 85% "other photos" (a
    measured pair with each bit flipped with p=0.3, the same mask on both hashes: ~19 bits from its seed, the
    per-bit skew of real phashes kept) and 15% near-duplicate copies (1-6 bits flipped in any earlier hash)."""
    m = len(full)
    n_other = round((n - m) * 0.85)
    n_copy = n - m - n_other
    shifts = np.arange(64, dtype=np.uint64)

    def pack(bitmat):
        return (bitmat.astype(np.uint64) << shifts).sum(axis=1, dtype=np.uint64)

    seed = rng.integers(0, m, n_other)
    mask = pack(rng.random((n_other, 64)) < 0.3)
    f = np.concatenate([full, full[seed] ^ mask])
    c = np.concatenate([center, center[seed] ^ mask])
    seed = rng.integers(0, len(f), n_copy)
    flips = rng.integers(1, 7, n_copy)
    ranks = rng.random((n_copy, 64)).argsort(axis=1).argsort(axis=1)
    mask = pack(ranks < flips[:, None])
    return np.concatenate([f, f[seed] ^ mask]), np.concatenate([c, c[seed] ^ mask])


def all_pairs(h, r):
    """Baseline: every pair, numpy popcount of a blocked xor (i < j)."""
    out = []
    for s in range(0, len(h), 500):
        d = np.bitwise_count(h[s : s + 500, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= r)
        keep = jj > ii + s
        out.append(np.stack([ii[keep] + s, jj[keep], d[ii[keep], jj[keep]]], axis=1).astype(np.int64))
    return np.concatenate(out)


def quality(checks, group, kinds, radius):
    """Per (method, radius): recall of the planted pairs, reported pairs, false pairs. group[i] is the source photo
    of check i (itself for a train photo); a pair is true when both ends come from the same photo."""
    targets = [i for i, k in enumerate(kinds) if k is not None and k not in DIAGNOSTIC]
    members = {}
    for i in targets:
        members.setdefault(group[i], [group[i]]).append(i)
    planted = {(a, b) for m in members.values() for a in m for b in m if a < b}
    orig_var = {}
    for i, k in enumerate(kinds):
        if k is not None:
            orig_var.setdefault(k, set()).add((group[i], i))
    full = np.array([c.phash for c in checks], np.uint64)
    stats = {}
    methods = {
        "phash": lambda r: hc.near_duplicate_pairs(full, r),
        "stage1": lambda r: hc.find_near_duplicates(checks, max_distance=r, min_correlation=None),
        "two-stage": lambda r: hc.find_near_duplicates(checks, max_distance=r),
    }
    for method, search in methods.items():
        for r in radius:
            pairs = search(r)
            found = {(int(a), int(b)) for a, b, _ in pairs}
            diag = {(a, b) for a, b in found if kinds[a] in DIAGNOSTIC or kinds[b] in DIAGNOSTIC}
            scored = found - {p for p in diag if group[p[0]] == group[p[1]]}
            false = {(a, b) for a, b in scored if group[a] != group[b]}
            stats[(method, r)] = {
                "pairs": pairs,
                "reported": len(scored),
                "planted": len(planted),
                "recall": len(planted & found) / len(planted),
                "by_kind": {k: len(v & found) / len(v) for k, v in orig_var.items()},
                "false": sorted(false),
                "false_rate": len(false) / max(1, len(scored)),
                "false_train_pairs": sum(1 for a, b in false if kinds[a] is None and kinds[b] is None),
            }
    return stats


def main() -> None:
    train = DATA / "train"
    if not train.is_dir():
        sys.exit(
            f"bench-health needs the grocery-store photos at {DATA} (train/ missing); set LOUPE_GROCERY_DIR. "
            "They are read in place and never copied into the repository."
        )
    files = sorted(str(p) for p in train.rglob("*.jpg"))
    for f in files:  # warm the page cache: every method below reads the same cached bytes
        Path(f).read_bytes()
    n = len(files)

    # 1. throughput
    t_base, base_hashes = best_of(lambda: baseline_scan(files))
    t_one, _ = best_of(lambda: hc.check_files(files, workers=1))
    t_first = time.perf_counter()
    checks = hc.check_files(files)  # first call: starts the fork server
    t_first = time.perf_counter() - t_first
    t_pool, checks = best_of(lambda: hc.check_files(files))
    me = multiprocessing.current_process()
    me.daemon = True  # what a Celery prefork child looks like: check_files falls back to threads
    try:
        t_threads, _ = best_of(lambda: hc.check_files(files))
    finally:
        me.daemon = False
    assert all(c.status == "ok" for c in checks), [c for c in checks if c.status != "ok"][:3]
    agree = np.mean([hc.hamming(c.phash, int(str(b), 16)) for c, b in zip(checks, base_hashes, strict=True)])
    base_rate, one_rate, pool_rate, first_rate = n / t_base, n / t_one, n / t_pool, n / t_first
    threads_rate = n / t_threads
    workers = os.cpu_count()

    # 3. quality (needs the variant hashes; done before the search so its hashes can seed the 100k set)
    rng = random.Random(SEED)
    sample = sorted(rng.sample(range(n), SAMPLE))
    tmp = Path(tempfile.mkdtemp(prefix="loupe-bench-health-"))
    try:
        variants = make_variants(files, sample, tmp)
        vchecks = hc.check_files([v[0] for v in variants])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    all_checks = checks + vchecks
    group = list(range(n)) + [v[1] for v in variants]
    kinds = [None] * n + [v[2] for v in variants]
    stats = quality(all_checks, group, kinds, RADII)
    r0 = hc.DEFAULT_MAX_DISTANCE
    q = stats[("two-stage", r0)]
    qp = stats[("phash", r0)]
    s1 = stats[("stage1", r0)]
    corr = hc.pair_correlations(all_checks, s1["pairs"])
    same = np.array([group[a] == group[b] for a, b, _ in s1["pairs"]])
    nodiag = np.array([kinds[a] not in DIAGNOSTIC and kinds[b] not in DIAGNOSTIC for a, b, _ in s1["pairs"]])
    corr_true_min = float(corr[same & nodiag].min())
    corr_false_max = float(corr[~same].max())

    # 2. search over 100k hashes
    full = np.array([c.phash for c in all_checks], np.uint64)
    center = np.array([c.phash_center for c in all_checks], np.uint64)
    f100, c100 = realistic_hashes(full, center, N_SEARCH, np.random.default_rng(SEED))
    t_mih, pairs100 = best_of(lambda: hc.near_duplicate_pairs(f100, r0), repeat=1)
    # find_near_duplicates end to end (both stages) on 100k FileChecks: synthetic ones borrow the 32x32 images of a
    # random measured file (stage 2 cost depends on the number of candidate pairs, not on the pixels).
    pick = np.random.default_rng(SEED).integers(0, len(all_checks), N_SEARCH)
    checks100 = [
        hc.FileCheck("", "ok", "", 348, 348, int(f), int(c), all_checks[k].thumb, all_checks[k].thumb_center)
        for f, c, k in zip(f100, c100, pick, strict=True)
    ]
    t_multi, pairs100c = best_of(lambda: hc.find_near_duplicates(checks100), repeat=1)
    t_brute, brute = best_of(lambda: all_pairs(f100[:N_BRUTE], r0), repeat=1)
    exact = np.array_equal(brute, hc.near_duplicate_pairs(f100[:N_BRUTE], r0))
    brute_100k = t_brute * (N_SEARCH / N_BRUTE) ** 2

    baseline = "PIL full decode + imagehash.phash, 1 process"
    results = {
        "scan_pool_img_s": metric(
            pool_rate,
            "images/s",
            baseline,
            base_rate,
            target=">= 1000 images/s and >= 2x baseline",
            met=pool_rate >= 1000 and pool_rate >= 2 * base_rate,
        ),
        "scan_pool_first_call_img_s": metric(first_rate, "images/s", baseline, base_rate),
        "scan_1_worker_img_s": metric(one_rate, "images/s", baseline, base_rate),
        "scan_threads_in_daemon_img_s": metric(threads_rate, "images/s", baseline, base_rate),
        "pairs_100k_phash_s": metric(
            t_mih,
            "s",
            f"all-pairs numpy popcount, {N_BRUTE} hashes x100 (quadratic)",
            brute_100k,
            target="< 30 s",
            met=t_mih < 30 and exact,
        ),
        "find_near_duplicates_100k_s": metric(
            t_multi,
            "s",
            f"all-pairs numpy popcount, {N_BRUTE} hashes x100 (quadratic)",
            brute_100k,
            target="< 30 s",
            met=t_multi < 30,
        ),
        "planted_recall": metric(
            q["recall"],
            "fraction",
            f"phash alone, r={r0}",
            qp["recall"],
            target=">= 0.99",
            met=q["recall"] >= 0.99,
        ),
        "false_pair_rate": metric(
            q["false_rate"],
            "fraction",
            f"phash alone, r={r0}",
            qp["false_rate"],
            target="<= 0.01",
            met=q["false_rate"] <= 0.01,
        ),
    }
    for kind in KINDS + DIAGNOSTIC:
        results[f"recall_{kind}"] = metric(
            q["by_kind"][kind],
            "fraction",
            f"phash alone, r={r0}",
            qp["by_kind"][kind],
            target=None if kind in DIAGNOSTIC else ">= 0.99",
            met=None if kind in DIAGNOSTIC else q["by_kind"][kind] >= 0.99,
        )
    sweep = "; ".join(
        f"r={r}: recall {stats[('two-stage', r)]['recall']:.4f} / {stats[('stage1', r)]['recall']:.4f} / "
        f"{stats[('phash', r)]['recall']:.4f}, false "
        + " / ".join(
            f"{len(stats[(m, r)]['false'])} of {stats[(m, r)]['reported']}" for m in ("two-stage", "stage1", "phash")
        )
        for r in RADII
    )
    notes = (
        f"{n} grocery train JPEGs, page cache warm, best of 3; pool = {workers} worker processes (forkserver, pool "
        "startup included; the first call also starts the fork server; threads_in_daemon = the thread-pool "
        "fallback used inside a daemonic process such as a Celery prefork child). check_file does validation, "
        "phash and the central-90% phash on a JPEG draft decode (1/4 size); mean |its phash - "
        f"imagehash.phash(full decode)| = {agree:.2f} bits. "
        f"Search: {N_SEARCH} hashes = {len(full)} measured (train + variants) + synthetic: 85% 'other photos' (a "
        "measured hash with each bit flipped with p=0.3, keeping the skewed per-bit statistics of real phashes), 15% "
        f"near-duplicate copies (1-6 bits flipped). near_duplicate_pairs: {len(pairs100)} pairs at r={r0}. "
        f"find_near_duplicates (stage 1 over 2x{N_SEARCH} hashes [phash; center], then stage 2 on the candidates; "
        f"synthetic checks borrow the 32x32 images of random measured files, so the {len(pairs100c)} pairs kept "
        "mean nothing; the time is what counts). All-pairs baseline "
        f"timed on {N_BRUTE} hashes ({t_brute:.2f} s) and extrapolated x100 to {N_SEARCH} (quadratic); the "
        f"multi-index result equals it on that sample: {exact}. "
        f"Quality: {SAMPLE} photos (seed {SEED}) x {len(KINDS)} variants saved as JPEG (q90 unless q60 is the edit), "
        f"planted pairs = every pair within a photo's group (original + its variants) = {q['planted']}, mixed into "
        f"all {n} train photos. Default find_near_duplicates (r={r0}, min_correlation={hc.DEFAULT_MIN_CORRELATION}): "
        f"recall {q['recall']:.4f}, {q['reported']} pairs reported, {len(q['false'])} false. Stage 1 alone: recall "
        f"{s1['recall']:.4f}, {len(s1['false'])} false of {s1['reported']} ({s1['false_train_pairs']} between two "
        "train photos, the rest a variant with such a neighbour of its original); I looked at ~30 train pairs, "
        f"{INSPECTED[0]} / {INSPECTED[1]} (distance 0) included: all consecutive shots of the same item, none the same "
        "photo, so they count as false, not as source duplicates. 32x32 correlation at stage 1: planted pairs >= "
        f"{corr_true_min:.4f}, other pairs <= {corr_false_max:.4f}. crop5_topleft (5% cut from the top and left "
        "borders only: content shifted, not just scaled) is a diagnostic outside the targets. Sweep "
        f"(two-stage / stage 1 / phash alone; false of reported): {sweep}."
    )
    if "--show" in sys.argv:
        paths = files + [v[0] for v in variants]
        for a, b in s1["false"][:60]:
            print("false at stage 1", a, b, paths[a], paths[b])
    path = write("health", results, notes)
    print(table(results))
    print(notes)
    print(f"written {path}")


if __name__ == "__main__":
    main()
