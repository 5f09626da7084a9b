"""Dataset health scan, pure functions (no Django): file checks + perceptual hashes, near-duplicate search,
near-identical class names, unknown-like names and the class distribution.

    check_file(path) -> FileCheck                       status ok | missing | zero_byte | unreadable | truncated
    check_files(paths, workers=, progress=)             same, on a process pool (thread pool where none can start)
    hamming(a, b)                                       popcount(a ^ b) == imagehash's `h1 - h2`
    near_duplicate_pairs(hashes, max_distance)          exact radius search, multi-index hashing (sub-quadratic)
    find_near_duplicates(checks, max_distance=, min_correlation=)   copies of the same photo, crop-tolerant
    pair_correlations(checks, pairs)                    32x32 correlation: same photo (~1) vs similar shot
    clusters_from_pairs(n, pairs)                       union-find components of size >= 2
    similar_names(names, min_ratio=)                    near-identical class names (rapidfuzz)
    is_unknown_like(name)                               catch-all labels: "Unknown", "N/A", "other", "-1", ...
    class_distribution(counts, min_samples=, dominant_share=)

Defaults measured by `make bench-health` (bench/health.py -> bench/results/health.json): 2,640 grocery-store photos
plus planted copies of 300 of them (JPEG q60, 50% resize, 5% cut from every border, brightness +-10%, all combined).
phash alone cannot meet ">= 99% of planted pairs found, <= 1% of reported pairs false": crops move the hash 10-26
bits, and at such radii different shots of the same product match. So find_near_duplicates has two stages:
  1. candidates within DEFAULT_MAX_DISTANCE = 10 bits, comparing each phash with the other's phash and with its
     central-90% hash (phash_center); every planted pair is within 8 bits this way (r=6: 99.95%, r=8: 100%), r=10
     leaves one step of margin;
  2. Pearson correlation of the 32x32 images behind the matching hashes >= DEFAULT_MIN_CORRELATION = 0.97: planted
     pairs scored >= 0.978, different photos <= 0.96 (consecutive shots of the same item from the same spot).
Result on the bench: recall 1.0, 0 false pairs (stage 1 alone: 286 false of 6,586). Not covered: crops from one side
only (the content shifts; recall 0 on the bench's diagnostic), rotations, flips, heavy edits.

Process pool (check_files): "forkserver" start method (never "fork": the caller may be a threaded web or Celery
process), worker modules preloaded in the fork server so each worker starts in milliseconds. Inside a daemonic
process (Celery prefork workers, multiprocessing pools), or where the pool cannot start at all, it falls back to
a thread pool: Pillow releases the GIL while decoding. Image.MAX_IMAGE_PIXELS is read in the calling process and
handed to the workers; truncated images are always reported (ImageFile.LOAD_TRUNCATED_IMAGES is forced to False
while decoding). Callers that use the process pool from a script need the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import stat
import threading
import unicodedata
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import imagehash
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Chosen from bench/health.py (planted near-duplicates of the grocery-store photos): see the module docstring.
DEFAULT_MAX_DISTANCE = 10
# Second stage of find_near_duplicates: correlation of the 32x32 images the hashes were computed from.
DEFAULT_MIN_CORRELATION = 0.97
# FileCheck.phash_center hashes the image without this fraction of every border.
CENTER_CROP = 0.05
# The decoded image handed to imagehash is at least this many pixels on its short side (imagehash resizes to 32).
_SMALL_SIDE = 64
_HASH_SIDE = 32  # imagehash.phash(hash_size=8, highfreq_factor=4) works on a 32x32 image
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
STATUSES = ("ok", "missing", "zero_byte", "unreadable", "truncated")


@dataclass(frozen=True)
class FileCheck:
    path: str
    status: str  # "ok" | "missing" | "zero_byte" | "unreadable" | "truncated"
    reason: str  # message a person can act on; "" when ok
    width: int | None  # full-resolution size from the header (stored orientation), None when not readable
    height: int | None
    phash: int | None  # 64-bit imagehash.phash (hash_size=8) as an unsigned int, MSB first; None unless ok
    # imagehash.phash of the central 90% of the image (CENTER_CROP cut from every border), same encoding. A copy
    # cropped by a few percent matches it much better than the full hash (see find_near_duplicates).
    phash_center: int | None = None
    # The 32x32 grayscale images (uint8, row-major, 1,024 bytes) that phash and phash_center were computed from:
    # the second stage of find_near_duplicates correlates them. None unless ok.
    thumb: bytes | None = None
    thumb_center: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------------- file checks

_truncation_lock = threading.Lock()
_truncation_depth = 0
_truncation_saved = False


@contextmanager
def _strict_truncation():
    """ImageFile.LOAD_TRUNCATED_IMAGES = False for the duration (re-entrant across this module's threads), so a
    truncated file raises instead of being padded with grey. A no-op when the caller never set it."""
    global _truncation_depth, _truncation_saved
    with _truncation_lock:
        if _truncation_depth == 0:
            _truncation_saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _truncation_depth += 1
    try:
        yield
    finally:
        with _truncation_lock:
            _truncation_depth -= 1
            if _truncation_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _truncation_saved


def _webp_declared_short(path: str, size: int) -> bool:
    """WebP files carry their length in the RIFF header; Pillow only says "could not create decoder object"."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return (
        len(head) == 12
        and head[:4] == b"RIFF"
        and head[8:] == b"WEBP"
        and size < int.from_bytes(head[4:8], "little") + 8
    )


def _hash_to_int(h: imagehash.ImageHash) -> int:
    # Same bit order as str(h) (row-major, first bit most significant), so hamming() == h1 - h2.
    return int.from_bytes(np.packbits(h.hash.reshape(-1)).tobytes(), "big")


def _decode_small(img: Image.Image) -> Image.Image:
    """Decode at reduced size, grayscale. JPEG: DCT-domain scaling (draft) decodes at 1/2..1/8 of full size but
    still reads all entropy-coded data, so a truncated file still raises. Other formats: full decode, then an
    integer box reduce."""
    if img.format == "JPEG":
        img.draft("L", (_SMALL_SIDE, _SMALL_SIDE))
    img.load()
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    small = img if img.mode == "L" else img.convert("L")
    factor = min(small.size) // _SMALL_SIDE
    if factor >= 2:
        small = small.reduce(factor)
    try:
        orientation = img.getexif().get(_ORIENTATION)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not fail an image that decodes
        orientation = None
    if orientation in _TRANSPOSE:
        small = small.transpose(_TRANSPOSE[orientation])
    return small


def _center(small: Image.Image) -> Image.Image:
    """The central region without CENTER_CROP of each border, resampled straight to imagehash's 32x32 (a float
    crop box, so the cut is exact even on a 43-pixel draft image)."""
    w, h = small.size
    box = (w * CENTER_CROP, h * CENTER_CROP, w * (1 - CENTER_CROP), h * (1 - CENTER_CROP))
    return small.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS, box=box)


def _is_truncation(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, EOFError) or "truncated" in msg or "premature end" in msg


def check_file(path: str) -> FileCheck:
    """Validate one image file and hash it. Never raises for a bad file: the problem is in status/reason."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return FileCheck(path, "missing", "file not found (moved or deleted since import?)", None, None, None)
    except OSError as e:
        return FileCheck(path, "unreadable", f"cannot stat file: {e.strerror or e}", None, None, None)
    if not stat.S_ISREG(st.st_mode):
        return FileCheck(path, "unreadable", "not a regular file", None, None, None)
    if st.st_size == 0:
        return FileCheck(path, "zero_byte", "file is empty (0 bytes): re-export or re-download it", None, None, None)
    width = height = None
    try:
        with _strict_truncation(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, palette transparency, EXIF warnings
            with Image.open(path) as img:
                width, height = img.size
                small = _decode_small(img)
        # imagehash.phash converts to L and resizes to 32x32 with LANCZOS itself: doing it here first changes no
        # bit (the resize to the same size is a copy) and keeps the 32x32 image for the second stage.
        img32 = small.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS)
        center32 = _center(small)
        phash = _hash_to_int(imagehash.phash(img32))
        phash_center = _hash_to_int(imagehash.phash(center32))
    except Image.DecompressionBombError as e:
        return FileCheck(path, "unreadable", f"refused as a possible decompression bomb: {e}", None, None, None)
    except UnidentifiedImageError:
        reason = "not an image Pillow can read (unknown format or corrupt header)"
        if _webp_declared_short(path, st.st_size):
            return FileCheck(path, "truncated", "file ends early (WebP shorter than its header says)", None, None, None)
        return FileCheck(path, "unreadable", reason, None, None, None)
    except PermissionError as e:
        return FileCheck(path, "unreadable", f"permission denied: {e.strerror or e}", width, height, None)
    except MemoryError:
        return FileCheck(path, "unreadable", "out of memory while decoding", width, height, None)
    except Exception as e:  # noqa: BLE001 - codecs raise OSError, SyntaxError, ValueError, struct.error, ...
        if _is_truncation(e) or _webp_declared_short(path, st.st_size):
            return FileCheck(path, "truncated", f"file ends early, image is incomplete ({e})", width, height, None)
        return FileCheck(path, "unreadable", f"cannot decode image: {type(e).__name__}: {e}", width, height, None)
    return FileCheck(path, "ok", "", width, height, phash, phash_center, img32.tobytes(), center32.tobytes())


def _init_worker(max_image_pixels) -> None:
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _check_chunk(paths: list[str]) -> list[FileCheck]:
    return [check_file(p) for p in paths]


# scipy.fftpack is what imagehash.phash imports lazily: load it once in the fork server, not in every worker.
_FORKSERVER_PRELOAD = [__name__, "scipy.fftpack"]


def _process_executor(workers: int) -> Executor:
    ctx = multiprocessing.get_context(
        "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    )
    if ctx.get_start_method() == "forkserver":
        # Only takes effect when this process starts its fork server; harmless otherwise.
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(Image.MAX_IMAGE_PIXELS,)
    )


def pool_kind(workers: int | None = None) -> str:
    """What check_files would use here: "inline", "thread" (inside a daemonic process) or "process"."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1:
        return "inline"
    return "thread" if multiprocessing.current_process().daemon else "process"


def check_files(
    paths: Sequence[str],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[FileCheck]:
    """check_file over many paths, results in the order of `paths`. workers: default os.cpu_count(); 1 runs
    in-process. Lists too short to pay for a pool (< 4 chunks) run in-process too. progress(done, total) is called
    from this (the calling) thread after every chunk.

    Pools: worker processes ("forkserver"); inside a daemonic process, or when no process can be started, threads
    (with a RuntimeWarning in the second case). If a worker process dies mid-scan (a decoder crash, the OOM
    killer), the files of the chunks it was working on are re-checked one at a time in a fresh process, so the
    file that kills it is reported "unreadable" instead of taking the calling process down."""
    scan = _Scan([os.fspath(p) for p in paths], max(1, int(workers or os.cpu_count() or 1)), progress)
    if scan.workers == 1 or len(scan.chunks) < 4:
        with _strict_truncation():
            for k in range(len(scan.chunks)):
                scan.record(k, _check_chunk(scan.chunks[k]))
        return scan.results  # type: ignore[return-value]
    if pool_kind(scan.workers) == "process":
        try:
            scan.run_processes()
            return scan.results  # type: ignore[return-value]
        except _PoolUnavailable as e:
            warnings.warn(f"check_files: no worker process could start ({e}); using threads", RuntimeWarning, 2)
    with _strict_truncation(), ThreadPoolExecutor(max_workers=scan.workers) as executor:
        scan.run(executor, scan.unfinished(), set())
    return scan.results  # type: ignore[return-value]


class _PoolUnavailable(RuntimeError):
    pass


class _Scan:
    def __init__(self, paths: list[str], workers: int, progress):
        self.paths, self.workers, self.progress = paths, workers, progress
        self.total = len(paths)
        self.chunk = max(8, min(128, math.ceil(self.total / (workers * 8)))) if paths else 1
        self.chunks = [paths[i : i + self.chunk] for i in range(0, self.total, self.chunk)]
        self.results: list[FileCheck | None] = [None] * self.total
        self.done = 0
        self.worked = False  # a worker process has returned at least one result

    def record(self, k: int, part: list[FileCheck]) -> None:
        self.results[k * self.chunk : k * self.chunk + len(part)] = part
        self.done += len(part)
        if self.progress:
            self.progress(self.done, self.total)

    def unfinished(self) -> list[int]:
        return [k for k in range(len(self.chunks)) if self.results[k * self.chunk] is None]

    def run(self, executor: Executor, todo: list[int], inflight: set[int]) -> None:
        # At most 2 chunks in flight per worker keeps memory flat and progress regular.
        pending = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < 2 * self.workers:
                k = queue.pop(0)
                pending[executor.submit(_check_chunk, self.chunks[k])] = k
                inflight.add(k)
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                k = pending.pop(fut)
                self.record(k, fut.result())
                inflight.discard(k)
                self.worked = True

    def run_processes(self) -> None:
        while todo := self.unfinished():
            inflight: set[int] = set()
            try:
                with _process_executor(self.workers) as executor:
                    self.run(executor, todo, inflight)
            except (BrokenProcessPool, OSError, AssertionError, NotImplementedError, ImportError) as e:
                if not self.worked:
                    raise _PoolUnavailable(repr(e)) from e
                self.isolate(sorted(inflight))

    def isolate(self, suspects: list[int]) -> None:
        """Re-check the files of the chunks that were in flight when a worker died, one per task in a one-worker
        pool (restarted after each death): the file that kills it is reported unreadable."""
        executor = _process_executor(1)
        try:
            for k in suspects:
                part = []
                for path in self.chunks[k]:
                    try:
                        part += executor.submit(_check_chunk, [path]).result()
                    except BrokenProcessPool:
                        executor.shutdown(wait=False, cancel_futures=True)
                        executor = _process_executor(1)
                        reason = "the image decoder crashed on this file (its worker process died)"
                        part.append(FileCheck(path, "unreadable", reason, None, None, None))
                self.record(k, part)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ near-duplicates


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


@lru_cache(maxsize=64)
def _flip_masks(bits: int, radius: int) -> np.ndarray:
    """All values of `bits` bits with at most `radius` bits set (the probes of one multi-index table)."""
    out = [0]
    for k in range(1, radius + 1):
        for combo in combinations(range(bits), k):
            out.append(sum(1 << b for b in combo))
    return np.asarray(out, dtype=np.int64)


def _plan(n: int, r: int) -> int:
    """Number of substrings m for multi-index hashing (0 = blocked all-pairs), from a cost model in nanoseconds
    measured with numpy on this project's 2-core bench machine: ~13 ns per (probe, hash), ~10 ns per candidate
    pair (n^2 / 2^bits / 2 per probe for uniform bits), ~6 ns per pair for the blocked all-pairs popcount."""
    best, best_cost = 0, 3.0 * n * n
    for m in (3, 4, 5, 6, 8):
        bits = 64 // m
        probes = sum(math.comb(bits, k) for k in range(r // m + 1))
        cost = m * probes * (13.0 * n + 5.0 * n * n / 2**bits) + m * 5.0 * 2**bits
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _brute_pairs(h: np.ndarray, r: int) -> np.ndarray:
    n = len(h)
    out = []
    block = max(1, 4_000_000 // max(n, 1))
    for s in range(0, n, block):
        a = h[s : s + block]
        d = np.bitwise_count(a[:, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= r)
        keep = jj > ii + s
        ii, jj = ii[keep], jj[keep]
        out.append(np.stack([ii + s, jj, d[ii, jj].astype(np.int64)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair (i, j), i < j, with popcount(hashes[i] ^ hashes[j]) <= max_distance, as int64 rows
    (i, j, distance) sorted by (i, j). Exact.

    Multi-index hashing (Norouzi et al., "Fast search in Hamming space with multi-index hashing", CVPR 2012): cut
    the 64 bits into m substrings; by the pigeonhole principle two hashes within distance r agree on at least one
    substring up to floor(r/m) bits. For each substring, bucket the hashes by value (counting sort into a
    2^bits table) and probe, for every hash, each value within floor(r/m) flipped bits; candidates are then
    verified on all 64 bits. Expected cost m * P * (n + n^2 / 2^bits) for P = sum_{k<=r/m} C(bits, k) probes
    (r=10, m=4: P=137): linear while n is below ~2^bits, with a 1/65536 quadratic term after that; m is picked by
    a cost model (small n or large radii use a blocked all-pairs popcount). Before cutting, the bits are
    interleaved (bit b goes to substring b mod m): Hamming distance is invariant to a bit permutation, and phash
    bits are ordered by DCT frequency, so neighbouring bits are correlated and contiguous substrings would bucket
    unevenly.

    Hand-written (numpy) because the library options measured slower on 100,000 hashes at r=10 on 2 cores:
    faiss IndexBinaryMultiHash(64, 4, 16) with nflip=2 (also exact) 10.7 s, IndexBinaryFlat range_search is
    quadratic; this takes about 2 s."""
    h = np.ascontiguousarray(np.asarray(hashes).astype(np.uint64, copy=False)).reshape(-1)
    r = int(max_distance)
    if r < 0 or len(h) < 2:
        return np.zeros((0, 3), np.int64)
    r = min(r, 64)
    m = _plan(len(h), r)
    return _brute_pairs(h, r) if m == 0 else _mih_pairs(h, r, m)


_CANDIDATES_PER_STEP = 1 << 22  # bounds the temporary arrays (a few hundred MB at most) when buckets are crowded


def _mih_pairs(h: np.ndarray, r: int, m: int) -> np.ndarray:
    """Multi-index hashing with m interleaved substrings (see near_duplicate_pairs)."""
    n = len(h)
    s = r // m
    bits_all = ((h[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)  # (n, 64)
    idx = np.arange(n, dtype=np.int64)
    found = []
    for t in range(m):
        cols = np.arange(t, 64, m)
        w = len(cols)
        vals = (bits_all[:, cols].astype(np.int64) << np.arange(w, dtype=np.int64)).sum(axis=1)
        order = np.argsort(vals, kind="stable")
        counts = np.bincount(vals, minlength=1 << w)
        starts = np.cumsum(counts) - counts
        # Each unordered (bucket, bucket ^ mask) pair is visited once: from the smaller value for mask != 0,
        # both members of the same bucket for mask == 0 (kept with src < dst).
        for mask in _flip_masks(w, s):
            q = vals ^ mask
            sel = idx if mask == 0 else idx[vals < q]
            qs = q[sel]
            c = counts[qs]
            cum = np.cumsum(c)
            if len(cum) == 0 or cum[-1] == 0:
                continue
            cuts = [0, *np.searchsorted(cum, np.arange(_CANDIDATES_PER_STEP, cum[-1], _CANDIDATES_PER_STEP)), len(c)]
            for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
                hi = max(hi, lo + 1)
                seg_c = c[lo:hi]
                tot = int(seg_c.sum())
                if tot == 0:
                    continue
                src = np.repeat(sel[lo:hi], seg_c)
                dst = order[np.repeat(starts[qs[lo:hi]] - (np.cumsum(seg_c) - seg_c), seg_c) + np.arange(tot)]
                if mask == 0:
                    keep = src < dst
                    src, dst = src[keep], dst[keep]
                d = np.bitwise_count(h[src] ^ h[dst])
                ok = d <= r
                if ok.any():
                    a, b = src[ok], dst[ok]
                    found.append(np.stack([np.minimum(a, b), np.maximum(a, b), d[ok].astype(np.int64)], axis=1))
    if not found:
        return np.zeros((0, 3), np.int64)
    pairs = np.concatenate(found)
    # A pair within radius can match on several substrings: keep one row per (i, j), sorted.
    _, first = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    return pairs[first]


def find_near_duplicates(
    checks: Sequence[FileCheck],
    *,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    min_correlation: float | None = DEFAULT_MIN_CORRELATION,
) -> np.ndarray:
    """Copies of the same photo among `checks` (re-encoded, resized, cropped by a few percent, brightened):
    int64 rows (i, j, distance), i < j, indexes into `checks` (those not ok are skipped), sorted by (i, j).

    Stage 1, candidates: distance = min(d(phash_i, phash_j), d(phash_i, center_j), d(center_i, phash_j)) <=
    max_distance, with center = FileCheck.phash_center (center-to-center is not used). phash is robust to
    re-encoding, resizing and brightness (<= 4 bits on the bench) but not to cropping: a copy with 5% cut from
    every border is 10-26 bits away, where different photos of the same product start to match; its full hash is
    within 4 bits of the original's central-90% hash instead. One exact search (near_duplicate_pairs) over the 2n
    hashes [phash; center] finds both.
    Stage 2 (min_correlation not None): keep a candidate only if the Pearson correlation of the 32x32 images the
    matching hashes came from (FileCheck.thumb / thumb_center, best of the three alignments) is >= min_correlation.
    On the bench every planted copy scored >= 0.978 and every pair of different photos <= 0.96, consecutive shots
    of the same item from the same spot included: those pass stage 1 but are different photos. Pass
    min_correlation=None to get them too ("similar shots"), and pair_correlations() to tell the two apart."""
    ok = np.array([c.status == "ok" and c.phash is not None for c in checks], dtype=bool)
    idx = np.nonzero(ok)[0]
    n = len(idx)
    if n < 2:
        return np.zeros((0, 3), np.int64)
    full = np.array([checks[k].phash for k in idx], dtype=np.uint64)
    center = np.array(
        [checks[k].phash if checks[k].phash_center is None else checks[k].phash_center for k in idx], dtype=np.uint64
    )
    pairs = near_duplicate_pairs(np.concatenate([full, center]), max_distance)
    a, b, d = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    keep = (a < n) & (a % n != b % n)  # a < b, so a >= n means center-to-center
    ia, ib, d = a[keep] % n, b[keep] % n, d[keep]
    i, j = np.minimum(ia, ib), np.maximum(ia, ib)
    order = np.lexsort((d, j, i))
    i, j, d = i[order], j[order], d[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    out = np.stack([idx[i[first]], idx[j[first]], d[first]], axis=1).astype(np.int64).reshape(-1, 3)
    if min_correlation is not None and len(out):
        out = out[pair_correlations(checks, out) >= min_correlation]
    return out


def _unit_rows(blobs: list[bytes | None]) -> np.ndarray:
    """(k, 1024) float32, each row centered and scaled to unit norm; rows of missing or flat images are 0."""
    size = _HASH_SIDE * _HASH_SIDE
    mat = np.zeros((len(blobs), size), np.float32)
    for r, blob in enumerate(blobs):
        if blob is not None and len(blob) == size:
            mat[r] = np.frombuffer(blob, np.uint8)
    mat -= mat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(mat, axis=1, keepdims=True)
    return np.divide(mat, norm, out=np.zeros_like(mat), where=norm > 1e-3)


def pair_correlations(checks: Sequence[FileCheck], pairs: np.ndarray, *, batch: int = 4096) -> np.ndarray:
    """For each row (i, j, ...) of pairs: the Pearson correlation of the 32x32 images of checks i and j, the best
    of full/full, full/center and center/full. ~1.0: the same photo; 0.85-0.96: another shot of the same scene.
    Two flat (single-colour) images count as 1.0; a missing thumbnail as -1.0."""
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.size == 0:
        return np.zeros(0, np.float64)
    pairs = pairs.reshape(-1, pairs.shape[-1])
    out = np.empty(len(pairs), np.float64)
    for s in range(0, len(pairs), batch):
        i, j = pairs[s : s + batch, 0], pairs[s : s + batch, 1]
        fi = _unit_rows([checks[k].thumb for k in i])
        fj = _unit_rows([checks[k].thumb for k in j])
        ci = _unit_rows([checks[k].thumb_center for k in i])
        cj = _unit_rows([checks[k].thumb_center for k in j])
        corr = np.maximum.reduce(
            [np.einsum("ij,ij->i", fi, fj), np.einsum("ij,ij->i", fi, cj), np.einsum("ij,ij->i", ci, fj)]
        ).astype(np.float64)
        missing = np.array([checks[x].thumb is None or checks[y].thumb is None for x, y in zip(i, j, strict=True)])
        flat_i, flat_j = ~fi.any(axis=1), ~fj.any(axis=1)
        corr[flat_i & flat_j] = 1.0
        corr[missing] = -1.0
        out[s : s + batch] = corr
    return out


def clusters_from_pairs(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components of size >= 2 (union-find with path halving), members sorted, clusters sorted by
    their first member."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    arr = np.asarray(pairs, dtype=np.int64)
    for a, b in arr[:, :2].tolist() if arr.size else []:
        ra, rb = find(a), find(b)
        if ra != rb:
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    groups: dict[int, list[int]] = {}
    for x in range(n):
        groups.setdefault(find(x), []).append(x)
    return sorted((g for g in groups.values() if len(g) >= 2), key=lambda g: g[0])


# ---------------------------------------------------------------------------------------------------- class names

_NON_ALNUM = re.compile(r"[\W_]+", re.UNICODE)
_DIGITS = re.compile(r"\d+")


def normalize_name(name: str) -> str:
    """Case, accent, space and punctuation-insensitive key: "Toyota Corolla-2019" -> "toyotacorolla2019"."""
    text = unicodedata.normalize("NFKD", str(name)).casefold()
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return _NON_ALNUM.sub("", text)


def similar_names(names: Sequence[str], *, min_ratio: float = 85.0) -> list[tuple[str, str, float]]:
    """Pairs of class names that are probably the same class spelled differently, as (a, b, score) with a before
    b in `names`, sorted by score (desc) then input order. Compared on normalize_name() keys; rules:

    - same key ("Toyota" / "toyota " / "TOYOTA!") -> score 100, whatever the length;
    - the digits must match ("iPhone 12" / "iPhone 13", "Corolla 2019" / "Corolla 2020" are different classes);
    - shorter key of 1-3 characters: only the same-key rule (BMW/BMX, Red/Reed, Cat/Car are real differences);
    - shorter key of 4-5 characters: Levenshtein distance 1 and the same first character ("Grey"/"Gray",
      "Toyta"/"Toyota"; "Audi"/"Audio" is flagged too: a person decides);
    - longer: rapidfuzz fuzz.ratio (normalized Indel similarity, 0-100) >= min_ratio ("Volkswagen"/"Volkswagon").
    score is fuzz.ratio of the keys. 5,000 names take well under a second (rapidfuzz.process.cdist, all cores)."""
    from rapidfuzz import fuzz, process
    from rapidfuzz.distance import Levenshtein

    seen: dict[str, int] = {}
    uniq: list[str] = []
    for nm in names:
        if nm not in seen:
            seen[nm] = len(uniq)
            uniq.append(nm)
    keys = [normalize_name(nm) for nm in uniq]
    digits = [tuple(_DIGITS.findall(k)) for k in keys]
    lens = np.array([len(k) for k in keys])
    found: dict[tuple[int, int], float] = {}

    by_key: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    for members in by_key.values():
        for a, b in combinations(members, 2):
            found[(a, b)] = 100.0

    def consider(i: int, j: int) -> None:
        a, b = (i, j) if i < j else (j, i)
        if a == b or (a, b) in found or keys[a] == keys[b] or digits[a] != digits[b]:
            return
        short = min(lens[a], lens[b])
        if short <= 3:
            return
        if short <= 5:
            if keys[a][0] != keys[b][0] or Levenshtein.distance(keys[a], keys[b], score_cutoff=1) > 1:
                return
        elif fuzz.ratio(keys[a], keys[b]) < min_ratio:
            return
        found[(a, b)] = round(float(fuzz.ratio(keys[a], keys[b])), 2)

    # Short keys (4-5 characters) can only pair with keys of at most 6 within one edit.
    short_ids = np.nonzero((lens >= 4) & (lens <= 6))[0]
    if len(short_ids) > 1:
        sk = [keys[i] for i in short_ids]
        dist = process.cdist(sk, sk, scorer=Levenshtein.distance, score_cutoff=1, dtype=np.int32, workers=-1)
        for x, y in zip(*np.nonzero(np.triu(dist <= 1, k=1)), strict=True):
            consider(int(short_ids[x]), int(short_ids[y]))
    long_ids = np.nonzero(lens >= 6)[0]
    if len(long_ids) > 1:
        lk = [keys[i] for i in long_ids]
        sim = process.cdist(lk, lk, scorer=fuzz.ratio, score_cutoff=min_ratio, dtype=np.uint8, workers=-1)
        for x, y in zip(*np.nonzero(np.triu(sim >= math.floor(min_ratio), k=1)), strict=True):
            consider(int(long_ids[x]), int(long_ids[y]))
    rows = [(uniq[a], uniq[b], score) for (a, b), score in found.items()]
    order = sorted(range(len(rows)), key=lambda k: (-rows[k][2], seen[rows[k][0]], seen[rows[k][1]]))
    return [rows[k] for k in order]


_UNKNOWN_WHOLE = {
    "unknown", "unk", "unkn", "unknwn", "na", "n/a", "n.a.", "nan", "none", "null", "nil", "nothing", "other",
    "others", "misc", "miscellaneous", "various", "mixed", "tbd", "tba", "todo", "tbc", "nolabel", "unlabeled",
    "unlabelled", "label", "nocategory", "uncategorized", "uncategorised", "unclassified", "unidentified",
    "unspecified", "undefined", "notsure", "unsure", "dontknow", "idk", "ignore", "default", "generic", "x", "xx",
    "xxx", "empty", "blank", "missing", "notapplicable", "noclass", "rest", "etc",
}  # fmt: skip
# Words that make any name a catch-all when they stand alone at its start or end: "Unknown make", "Toyota (misc)".
_UNKNOWN_WORDS = {
    "unknown", "unk", "misc", "miscellaneous", "unlabeled", "unlabelled", "unclassified", "unidentified",
    "uncategorized", "uncategorised", "unspecified", "various", "tbd",
}  # fmt: skip
_OTHER_LEAD = {"other", "others", "misc", "generic"}


def is_unknown_like(name: str) -> bool:
    """True for catch-all or placeholder labels that should not be a class of their own: "Unknown", "unk", "N/A",
    "none", "other", "misc", "?", "-1", "9999", "0000", "no label", "tbd", "various", "", "Unknown model",
    "Other fruit", "Toyota (misc)". Real names that merely contain such words in the middle are not flagged."""
    raw = str(name).strip().casefold()
    if not raw or not any(ch.isalnum() for ch in raw):
        return True  # "", "?", "??", "-", "---", "..."
    if re.fullmatch(r"[-+]?\d+", raw):
        value = raw.lstrip("+-")
        # -1, 9999, 999, 0, 0000: sentinel codes. Other numbers (e.g. "2019", "3") can be real class names.
        return raw.startswith("-") or set(value) <= {"9"} and len(value) >= 3 or set(value) == {"0"}
    key = normalize_name(raw)
    if key in _UNKNOWN_WHOLE or raw in _UNKNOWN_WHOLE:
        return True
    words = [w for w in re.split(r"[\W_]+", raw) if w]
    if not words:
        return True
    if words[0] in _UNKNOWN_WORDS or words[-1] in _UNKNOWN_WORDS:
        return True
    if words[0] in _OTHER_LEAD and len(words) <= 3:
        return True
    return " ".join(words) in {"no label", "not sure", "dont know", "don t know", "not applicable", "no class"}


def class_distribution(counts: Mapping[str, int], *, min_samples: int = 10, dominant_share: float = 0.4) -> dict:
    """Summary of a label distribution: total, n_classes, rare (count < min_samples, ascending count then name),
    dominant (share of total > dominant_share, descending), imbalance_ratio (max/min over classes with count > 0,
    None with fewer than 2 such classes), counts ([name, count] by count desc, then name)."""
    items = [(str(k), int(v)) for k, v in counts.items()]
    total = sum(v for _, v in items)
    ordered = sorted(items, key=lambda kv: (-kv[1], kv[0]))
    rare = [k for k, v in sorted(items, key=lambda kv: (kv[1], kv[0])) if v < min_samples]
    dominant = [k for k, v in ordered if total > 0 and v / total > dominant_share]
    positive = [v for _, v in items if v > 0]
    imbalance = round(max(positive) / min(positive), 3) if len(positive) >= 2 else None
    return {
        "total": total,
        "n_classes": len(items),
        "rare": rare,
        "dominant": dominant,
        "imbalance_ratio": imbalance,
        "counts": [[k, v] for k, v in ordered],
    }
