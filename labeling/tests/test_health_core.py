"""labeling/health_core.py: file checks, hashes, near-duplicate search, class-name checks. No database."""

import io
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import imagehash
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageEnhance, ImageFile

from labeling import health_core as hc


def photo(seed: int, size=(240, 200)) -> Image.Image:
    """A photo-like RGB image: a smooth random field with a few blobs; different seeds look unrelated."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(base).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(4):
        cx, cy, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 60)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rad**2))[..., None]
        arr = arr * (1 - blob) + blob * rng.uniform(0, 255, 3)
    arr += rng.normal(0, 4, arr.shape)  # sensor-like noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def save(img: Image.Image, path, fmt="JPEG", **kw) -> str:
    img.save(path, fmt, **kw)
    return str(path)


# ------------------------------------------------------------------------------------------------ check_file


def test_check_file_statuses_and_sizes(tmp_path):
    jpg = save(photo(1, (300, 180)), tmp_path / "a.jpg", quality=90)
    png = save(photo(2, (123, 77)), tmp_path / "b.png", "PNG")
    webp = save(photo(3, (90, 140)), tmp_path / "c.webp", "WEBP")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    png_data = (tmp_path / "b.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(png_data[: len(png_data) // 2])
    webp_data = (tmp_path / "c.webp").read_bytes()
    (tmp_path / "trunc.webp").write_bytes(webp_data[: len(webp_data) // 2])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "adir.jpg").mkdir()

    ok = hc.check_file(jpg)
    assert (ok.status, ok.reason, ok.width, ok.height) == ("ok", "", 300, 180)
    assert 0 <= ok.phash < 2**64 and ok.phash_center is not None and len(ok.thumb) == len(ok.thumb_center) == 1024
    assert (hc.check_file(png).status, hc.check_file(png).width, hc.check_file(png).height) == ("ok", 123, 77)
    assert (hc.check_file(webp).status, hc.check_file(webp).width, hc.check_file(webp).height) == ("ok", 90, 140)

    expected = {
        "trunc.jpg": "truncated",
        "trunc.png": "truncated",
        "trunc.webp": "truncated",
        "zero.jpg": "zero_byte",
        "missing.jpg": "missing",
        "garbage.jpg": "unreadable",
        "adir.jpg": "unreadable",
    }
    for name, status in expected.items():
        check = hc.check_file(str(tmp_path / name))
        assert check.status == status, (name, check)
        assert check.reason and check.phash is None and check.thumb is None
    truncated = hc.check_file(str(tmp_path / "trunc.jpg"))
    assert (truncated.width, truncated.height) == (300, 180)  # the header is intact


def test_truncation_detected_even_when_caller_allows_truncated_images(tmp_path, monkeypatch):
    data = io.BytesIO()
    photo(4).save(data, "JPEG")
    (tmp_path / "t.jpg").write_bytes(data.getvalue()[: data.tell() // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert hc.check_file(str(tmp_path / "t.jpg")).status == "truncated"
    assert hc.check_files([str(tmp_path / "t.jpg")] * 3, workers=1)[2].status == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_decompression_bomb_is_unreadable(tmp_path, monkeypatch):
    path = save(photo(5, (200, 200)), tmp_path / "big.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # 40,000 px > 2x the limit: Pillow refuses
    check = hc.check_file(path)
    assert check.status == "unreadable" and "decompression bomb" in check.reason


def test_phash_is_imagehash_bits_and_hamming_is_imagehash_difference(tmp_path):
    paths = [save(photo(s), tmp_path / f"{s}.jpg", quality=92) for s in range(6)]
    checks = [hc.check_file(p) for p in paths]
    for p, c in zip(paths, checks, strict=True):
        with Image.open(p) as img:
            img.draft("L", (64, 64))
            small = img.convert("L")
        small = small.reduce(min(small.size) // 64) if min(small.size) >= 128 else small
        ours = imagehash.phash(small)
        assert c.phash == int(str(ours), 16)
        assert imagehash.hex_to_hash(f"{c.phash:016x}") == ours
        # close to imagehash on the full decode, although we hash a JPEG draft decode
        with Image.open(p) as img:
            assert hc.hamming(c.phash, int(str(imagehash.phash(img)), 16)) <= 6
    for a in checks:
        for b in checks:
            ha, hb = imagehash.hex_to_hash(f"{a.phash:016x}"), imagehash.hex_to_hash(f"{b.phash:016x}")
            assert hc.hamming(a.phash, b.phash) == ha - hb
    assert hc.hamming(0, 2**64 - 1) == 64


# ---------------------------------------------------------------------------------------------- check_files


def _files(tmp_path, n):
    paths = [save(photo(s % 7, (96, 96)), tmp_path / f"f{s:03d}.jpg", quality=85) for s in range(n)]
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths.insert(5, str(tmp_path / "empty.jpg"))
    paths.insert(9, str(tmp_path / "nope.jpg"))
    return paths


def test_check_files_inline_order_and_progress(tmp_path):
    paths = _files(tmp_path, 20)
    calls = []
    out = hc.check_files(paths, workers=1, progress=lambda done, total: calls.append((done, total)))
    assert [c.path for c in out] == paths
    assert [c.status for c in out].count("ok") == 20
    assert (out[5].status, out[9].status) == ("zero_byte", "missing")
    assert calls[-1] == (len(paths), len(paths)) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert hc.check_files([]) == []


def test_check_files_process_pool_matches_inline(tmp_path, monkeypatch):
    paths = _files(tmp_path, 60)
    big = save(photo(8, (200, 200)), tmp_path / "big.png", "PNG")
    paths.append(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # must reach the worker processes
    assert hc.pool_kind(2) == "process"
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # check_files warns when it falls back to threads
        pooled = hc.check_files(paths, workers=2, progress=lambda d, t: calls.append(d))
    assert pooled == hc.check_files(paths, workers=1)
    assert pooled[-1].status == "unreadable" and len(calls) >= 4 and calls[-1] == len(paths)


def test_check_files_falls_back_to_threads_in_a_daemon(tmp_path, monkeypatch):
    paths = _files(tmp_path, 40)
    expected = hc.check_files(paths, workers=1)
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)
    assert hc.pool_kind(2) == "thread"
    assert hc.check_files(paths, workers=2) == expected


def _scan_in_daemon(paths, queue):
    queue.put((hc.pool_kind(2), [c.status for c in hc.check_files(paths, workers=2)]))


def test_check_files_inside_a_real_daemonic_process(tmp_path):
    """Celery prefork children and multiprocessing pool workers are daemonic and may not start processes."""
    paths = _files(tmp_path, 40)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_scan_in_daemon, args=(paths, queue), daemon=True)
    proc.start()
    kind, statuses = queue.get(timeout=120)
    proc.join(30)
    assert kind == "thread" and statuses == [c.status for c in hc.check_files(paths, workers=1)]


def _install_poison():
    """Worker initializer: a file named poison.jpg kills the worker process, like a crashing decoder would."""
    real = hc.check_file

    def check_file(path):
        if path.endswith("poison.jpg"):
            os._exit(3)
        return real(path)

    hc.check_file = check_file


def test_a_file_that_kills_its_worker_is_reported_and_the_scan_goes_on(tmp_path, monkeypatch):
    paths = _files(tmp_path, 80)
    poison = save(photo(9, (64, 64)), tmp_path / "poison.jpg")
    paths.insert(70, poison)
    ctx = multiprocessing.get_context("forkserver")
    monkeypatch.setattr(
        hc, "_process_executor", lambda n: ProcessPoolExecutor(n, mp_context=ctx, initializer=_install_poison)
    )
    out = hc.check_files(paths, workers=2)
    assert [c.path for c in out] == paths
    assert out[70].status == "unreadable" and "crashed" in out[70].reason
    expected = hc.check_files(paths, workers=1)
    assert out[:70] + out[71:] == expected[:70] + expected[71:]


# ------------------------------------------------------------------------------------------ near-duplicates


def test_planted_near_duplicates_found_and_different_images_not(tmp_path):
    original = photo(10, (320, 240))
    w, h = original.size
    dx, dy = round(w * 0.05), round(h * 0.05)
    paths = [save(original, tmp_path / "orig.jpg", quality=95)]
    variants = {
        "q60": original,
        "half": original.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
        "bright": ImageEnhance.Brightness(original).enhance(1.1),
        "crop": original.crop((dx, dy, w - dx, h - dy)),
    }
    for name, img in variants.items():
        paths.append(save(img, tmp_path / f"{name}.jpg", quality=60 if name == "q60" else 90))
    others = [save(photo(100 + s, (320, 240)), tmp_path / f"other{s}.jpg") for s in range(12)]
    checks = hc.check_files(paths + others, workers=1)
    for c in checks[1:4]:  # re-encoded, resized, brightened: phash alone is enough
        assert hc.hamming(checks[0].phash, c.phash) <= 4
    assert hc.hamming(checks[0].phash_center, checks[4].phash) <= 4  # the crop matches the central-90% hash
    for c in checks[5:]:
        assert hc.hamming(checks[0].phash, c.phash) > hc.DEFAULT_MAX_DISTANCE

    pairs = hc.find_near_duplicates(checks)
    assert {(int(i), int(j)) for i, j, _ in pairs} == {(i, j) for i in range(5) for j in range(i + 1, 5)}
    assert hc.clusters_from_pairs(len(checks), pairs) == [[0, 1, 2, 3, 4]]
    corr = hc.pair_correlations(checks, pairs)
    assert corr.min() >= hc.DEFAULT_MIN_CORRELATION
    # not-ok checks are skipped, indexes still refer to the input list
    shifted = [hc.FileCheck("x", "missing", "file not found", None, None, None), *checks]
    assert np.array_equal(hc.find_near_duplicates(shifted)[:, :2], pairs[:, :2] + 1)


def brute(h: np.ndarray, r: int) -> np.ndarray:
    rows = [
        (i, j, hc.hamming(int(h[i]), int(h[j])))
        for i in range(len(h))
        for j in range(i + 1, len(h))
        if hc.hamming(int(h[i]), int(h[j])) <= r
    ]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def planted_hashes(seed: int, n: int, n_copies: int, max_flips: int, balanced: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if balanced:  # like phash: exactly 32 bits set, most significant bit almost always set
        bits = np.zeros((n, 64), np.uint64)
        for row in bits:
            row[rng.choice(64, 32, replace=False)] = 1
        h = (bits << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    else:
        h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    for _ in range(min(n_copies, n - 1)):
        src, dst = rng.integers(0, n, 2)
        flips = rng.choice(64, rng.integers(0, max_flips + 1), replace=False)
        h[dst] = h[src] ^ np.uint64(sum(1 << int(b) for b in flips))
    return h


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 120),
    n_copies=st.integers(0, 60),
    max_flips=st.integers(0, 14),
    radius=st.sampled_from([0, 1, 2, 3, 5, 6, 8, 10, 13, 16]),
    balanced=st.booleans(),
    m=st.sampled_from([0, 4, 5, 8]),
)
def test_near_duplicate_pairs_equals_brute_force(seed, n, n_copies, max_flips, radius, balanced, m):
    h = planted_hashes(seed, n, n_copies, max_flips, balanced)
    expected = brute(h, radius)
    assert np.array_equal(hc.near_duplicate_pairs(h, radius), expected)
    if n >= 2 and m:  # every multi-index layout, whatever the planner would pick
        assert np.array_equal(hc._mih_pairs(h, radius, m), expected)


def test_near_duplicate_pairs_larger_sets_use_multi_index(monkeypatch):
    h = planted_hashes(3, 4000, 1500, 12, balanced=True)
    assert hc._plan(len(h), 10) > 0
    expected = hc._brute_pairs(h, 10)
    assert len(expected) > 1000
    assert np.array_equal(hc.near_duplicate_pairs(h, 10), expected)
    monkeypatch.setattr(hc, "_CANDIDATES_PER_STEP", 1000)  # crowded buckets are processed in slices
    assert np.array_equal(hc._mih_pairs(h, 10, 3), expected)
    same = np.full(300, 12345, np.uint64)
    assert len(hc.near_duplicate_pairs(same, 0)) == 300 * 299 // 2
    assert hc.near_duplicate_pairs(np.zeros(0, np.uint64), 5).shape == (0, 3)
    assert hc.near_duplicate_pairs(np.array([1, 1], np.uint64), 0).tolist() == [[0, 1, 0]]


def test_clusters_from_pairs():
    pairs = np.array([[0, 3, 1], [3, 7, 2], [5, 6, 0], [2, 9, 4], [9, 2, 4]], np.int64)
    assert hc.clusters_from_pairs(10, pairs) == [[0, 3, 7], [2, 9], [5, 6]]
    assert hc.clusters_from_pairs(4, np.zeros((0, 3), np.int64)) == []


# --------------------------------------------------------------------------------------------- class names


def test_similar_names():
    names = ["Toyota", "Toyta", "Audi", "BMW", "Grey", "Gray", "Red", "Reed", "Land-Rover", "land rover",
             "iPhone 12", "iPhone 13", "Volkswagen", "Volkswagon", "Mercedes", "Peugeot", "bmw"]  # fmt: skip
    found = {(a, b): score for a, b, score in hc.similar_names(names)}
    for pair in [("Toyota", "Toyta"), ("Grey", "Gray"), ("Land-Rover", "land rover"), ("Volkswagen", "Volkswagon"),
                 ("BMW", "bmw")]:  # fmt: skip
        assert pair in found, pair
    assert found[("Land-Rover", "land rover")] == 100.0
    for a, b in [("Audi", "BMW"), ("Red", "Reed"), ("iPhone 12", "iPhone 13"), ("Mercedes", "Peugeot")]:
        assert (a, b) not in found and (b, a) not in found
    scores = [s for _, _, s in hc.similar_names(names)]
    assert scores == sorted(scores, reverse=True)


def test_similar_names_5000_in_under_2_seconds():
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    names = ["".join(rng.choice(letters, rng.integers(3, 16))) for _ in range(5000)]
    names += [n[:-1] for n in names[:20]]
    t = time.perf_counter()
    found = hc.similar_names(names)
    assert time.perf_counter() - t < 2.0
    assert len(found) >= 10


def test_is_unknown_like():
    for name in ["Unknown", "unk", "N/A", "na", "none", "None", "other", "Others", "misc", "?", "??", "9999", "-1",
                 "no label", "TBD", "various", "", "  ", "n.a.", "Unknown model", "Other fruit", "toyota_misc",
                 "unlabeled", "null", "0"]:  # fmt: skip
        assert hc.is_unknown_like(name), name
    for name in ["Toyota", "Corolla", "Granny-Smith", "Banana", "2019", "3", "Mother", "Nanaimo", "Una",
                 "Brother Printer", "Anjou"]:  # fmt: skip
        assert not hc.is_unknown_like(name), name


def test_class_distribution():
    dist = hc.class_distribution({"a": 50, "b": 30, "c": 5, "d": 0, "e": 15}, min_samples=10, dominant_share=0.4)
    assert dist["total"] == 100 and dist["n_classes"] == 5
    assert dist["rare"] == ["d", "c"]
    assert dist["dominant"] == ["a"]
    assert dist["imbalance_ratio"] == 10.0
    assert dist["counts"] == [["a", 50], ["b", 30], ["e", 15], ["c", 5], ["d", 0]]
    one = hc.class_distribution({"only": 3})
    assert one["imbalance_ratio"] is None and one["dominant"] == ["only"] and one["rare"] == ["only"]
    empty = hc.class_distribution({})
    assert empty == {"total": 0, "n_classes": 0, "rare": [], "dominant": [], "imbalance_ratio": None, "counts": []}
