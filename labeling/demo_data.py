"""Deterministic synthetic LEGO-like photo set for demos and tests.

``generate_demo(out_dir)`` writes::

    out_dir/images/<group>_<seq>.jpg   flat folder of JPEG photos
    out_dir/labels.csv                 image_filename,part,color,source,group
    out_dir/planted.json               the problems planted on purpose

Every image shows one part (a 2.5-D polygon rendering with studs and
Lambert shading) in a random pose, scale and position on a random
background, under random lighting, with a little blur and sensor noise.
Photos come in groups of 2-4 shots of "the same physical part"; about 30 %
of the groups are ``real`` (noisier, cluttered backgrounds, JPEG
artefacts), the rest ``synthetic``.  About 4 % of the rows carry the colour
``9999`` (LEGO's "unknown colour").

Planted problems (see ``planted.json``): flipped part labels,
near-duplicate pairs with conflicting part labels, two corrupt files
(one truncated JPEG, one non-image) and a few images smaller than 224 px.

Pure Python + Pillow + NumPy; no Django.  Output is byte-identical for a
given seed (all randomness comes from ``random.Random(seed)`` and
``numpy.random.default_rng`` seeded from the seed and the image index).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "CSV_HEADER",
    "COLOR_PALETTE",
    "DemoSummary",
    "PART_NAMES",
    "UNKNOWN_COLOR",
    "generate_demo",
]

CSV_HEADER = ["image_filename", "part", "color", "source", "group"]
UNKNOWN_COLOR = "9999"

# LEGO-like colour names and sRGB values (first eight are the defaults).
COLOR_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (201, 26, 9),
    "blue": (0, 85, 191),
    "yellow": (245, 205, 47),
    "green": (35, 130, 60),
    "black": (33, 33, 36),
    "white": (244, 244, 240),
    "orange": (254, 138, 24),
    "tan": (228, 205, 158),
    "light_bluish_gray": (160, 165, 169),
    "dark_bluish_gray": (99, 95, 97),
    "lime": (187, 233, 11),
    "dark_red": (114, 14, 15),
    "medium_azure": (54, 174, 191),
    "magenta": (160, 40, 120),
    "reddish_brown": (88, 42, 18),
    "dark_blue": (10, 35, 64),
}

# Geometry units: 1.0 = one stud pitch; brick height 1.2, plate height 0.4.
_BRICK_H = 1.2
_PLATE_H = 0.4
_STUD_R = 0.3
_STUD_H = 0.2

_N_FLIP_FRACTION = 0.03
_UNKNOWN_FRACTION = 0.04
_REAL_FRACTION = 0.30
_N_NEAR_DUPLICATES = 4
_N_SMALL = 5


# --------------------------------------------------------------------------
# Tiny polyhedral geometry: a part is a list of layers, a layer a list of
# primitives, a primitive a list of faces (vertices, outward normal, tone).
# Layers are painted in order; within a layer primitives are painted far to
# near; within a primitive back faces are culled and the rest sorted by depth.
# --------------------------------------------------------------------------


@dataclass
class _Face:
    verts: np.ndarray  # (n, 3) local coordinates
    normal: np.ndarray  # (3,) outward unit normal
    tone: float = 1.0  # multiplier on the part colour (holes are dark)
    decal: bool = False  # drawn without back-face culling / lighting
    smooth: bool = False  # facet of a curved surface: no outline


@dataclass
class _Prim:
    faces: list[_Face]

    @property
    def center(self) -> np.ndarray:
        return np.mean(np.concatenate([f.verts for f in self.faces]), axis=0)


def _ccw(poly: list[tuple[float, float]]) -> list[tuple[float, float]]:
    area = 0.0
    for (u0, v0), (u1, v1) in zip(poly, poly[1:] + poly[:1], strict=True):
        area += u0 * v1 - u1 * v0
    return poly if area > 0 else poly[::-1]


def _extrude(profile, w0: float, w1: float, axes: str = "xyz", tone: float = 1.0, smooth: bool = False) -> _Prim:
    """Extrude a 2-D profile (u, v) along w; ``axes`` names the x/y/z axes of u, v, w."""
    prof = _ccw([(float(u), float(v)) for u, v in profile])
    idx = ["xyz".index(a) for a in axes]

    def to_xyz(u, v, w):
        p = [0.0, 0.0, 0.0]
        p[idx[0]], p[idx[1]], p[idx[2]] = u, v, w
        return p

    faces = []
    top = np.array([to_xyz(u, v, w1) for u, v in prof])
    bot = np.array([to_xyz(u, v, w0) for u, v in prof[::-1]])
    faces.append(_Face(top, np.array(to_xyz(0, 0, 1.0)), tone))
    faces.append(_Face(bot, np.array(to_xyz(0, 0, -1.0)), tone))
    n = len(prof)
    for i in range(n):
        (ua, va), (ub, vb) = prof[i], prof[(i + 1) % n]
        eu, ev = ub - ua, vb - va
        ln = math.hypot(eu, ev)
        if ln < 1e-9:
            continue
        quad = np.array([to_xyz(ua, va, w0), to_xyz(ub, vb, w0), to_xyz(ub, vb, w1), to_xyz(ua, va, w1)])
        faces.append(_Face(quad, np.array(to_xyz(ev / ln, -eu / ln, 0.0)), tone, smooth=smooth))
    return _Prim(faces)


def _box(x0, x1, y0, y1, z0, z1) -> _Prim:
    return _extrude([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], z0, z1)


def _circle(cx, cy, r, n=20, start=0.0, end=2 * math.pi):
    return [
        (cx + r * math.cos(start + (end - start) * k / n), cy + r * math.sin(start + (end - start) * k / n))
        for k in range(n)
    ]


def _cylinder(cx, cy, r, z0, z1, n=20, tone=1.0) -> _Prim:
    return _extrude(_circle(cx, cy, r, n), z0, z1, tone=tone, smooth=True)


def _frustum(cx, cy, r0, r1, z0, z1, n=22) -> _Prim:
    faces = []
    h = z1 - z0
    ring0 = [(cx + r0 * math.cos(2 * math.pi * k / n), cy + r0 * math.sin(2 * math.pi * k / n)) for k in range(n)]
    ring1 = [(cx + r1 * math.cos(2 * math.pi * k / n), cy + r1 * math.sin(2 * math.pi * k / n)) for k in range(n)]
    faces.append(_Face(np.array([(x, y, z1) for x, y in ring1]), np.array([0.0, 0.0, 1.0])))
    faces.append(_Face(np.array([(x, y, z0) for x, y in ring0[::-1]]), np.array([0.0, 0.0, -1.0])))
    for k in range(n):
        k2 = (k + 1) % n
        phi = 2 * math.pi * (k + 0.5) / n
        nrm = np.array([h * math.cos(phi), h * math.sin(phi), r0 - r1])
        nrm /= np.linalg.norm(nrm)
        quad = np.array([(*ring0[k], z0), (*ring0[k2], z0), (*ring1[k2], z1), (*ring1[k], z1)])
        faces.append(_Face(quad, nrm, smooth=True))
    return _Prim(faces)


def _disc(cx, cy, r, z, tone, n=18) -> _Prim:
    verts = np.array([(x, y, z) for x, y in _circle(cx, cy, r, n)])
    return _Prim([_Face(verts, np.array([0.0, 0.0, 1.0]), tone, decal=True)])


def _studs(positions, z) -> list[_Prim]:
    return [_cylinder(x, y, _STUD_R, z, z + _STUD_H, n=16) for x, y in positions]


def _grid(nx: int, ny: int) -> list[tuple[float, float]]:
    return [(i - (nx - 1) / 2, j - (ny - 1) / 2) for i in range(nx) for j in range(ny)]


def _brick(nx, ny, h=_BRICK_H, studs=True):
    layers = [[_box(-nx / 2, nx / 2, -ny / 2, ny / 2, 0.0, h)]]
    if studs:
        layers.append(_studs(_grid(nx, ny), h))
    return layers


def _slope(nx: int, ny: int = 2):
    prof = [(-ny / 2, 0.0), (ny / 2, 0.0), (ny / 2, _BRICK_H), (ny / 2 - 1, _BRICK_H), (-ny / 2, 0.3)]
    base = _extrude(prof, -nx / 2, nx / 2, axes="yzx")
    studs = _studs([(i - (nx - 1) / 2, ny / 2 - 0.5) for i in range(nx)], _BRICK_H)
    return [[base], studs]


def _round(r: float, studs_at):
    neck_r = r * 0.8
    return [
        [_cylinder(0, 0, r, 0.0, 0.95, n=26)],
        [_cylinder(0, 0, neck_r, 0.95, _BRICK_H, n=24)],
        _studs(studs_at, _BRICK_H),
    ]


def _arch():
    prof = [(-2.0, 0.0), (-1.0, 0.0)]
    prof += [(math.cos(t), 0.85 * math.sin(t)) for t in np.linspace(math.pi, 0.0, 14)[1:-1]]
    prof += [(1.0, 0.0), (2.0, 0.0), (2.0, _BRICK_H), (-2.0, _BRICK_H)]
    base = _extrude(prof, -0.5, 0.5, axes="xzy")
    return [[base], _studs([(-1.5, 0), (-0.5, 0), (0.5, 0), (1.5, 0)], _BRICK_H)]


def _cone():
    return [
        [_cylinder(0, 0, 0.5, 0.0, 0.14, n=26)],
        [_frustum(0, 0, 0.5, 0.22, 0.14, _BRICK_H)],
        [_cylinder(0, 0, 0.21, _BRICK_H, _BRICK_H + 0.16, n=16)],
    ]


def _wedge_plate():
    foot = [(-2.0, -1.0), (2.0, -1.0), (2.0, 1.0), (0.0, 1.0)]
    base = _extrude(foot, 0.0, _PLATE_H)
    studs = _studs([(1.5, 0.5), (1.5, -0.5), (0.5, 0.5), (0.5, -0.5), (-0.5, -0.5)], _PLATE_H)
    return [[base], studs]


def _technic_beam(n_holes: int = 5):
    half = (n_holes - 1) / 2
    prof = _circle(half, 0.0, 0.5, 12, -math.pi / 2, math.pi / 2) + [(half, 0.5)]
    prof += _circle(-half, 0.0, 0.5, 12, math.pi / 2, 3 * math.pi / 2) + [(-half, -0.5)]
    h = 0.95
    base = _extrude(prof, 0.0, h)
    holes = []
    for i in range(n_holes):
        x = i - half
        holes.append(_disc(x, 0.0, 0.31, h + 1e-3, tone=0.62))
        holes.append(_disc(x, 0.0, 0.24, h + 2e-3, tone=0.18))
    return [[base], holes]


def _tile(nx, ny):
    # A tile: no studs, plus a thin groove line around the bottom edge.
    return [
        [_box(-nx / 2, nx / 2, -ny / 2, ny / 2, 0.0, 0.07)],
        [_box(-nx / 2 + 0.04, nx / 2 - 0.04, -ny / 2 + 0.04, ny / 2 - 0.04, 0.07, _PLATE_H)],
    ]


_PART_BUILDERS = {
    "brick_1x1": lambda: _brick(1, 1),
    "brick_1x2": lambda: _brick(2, 1),
    "brick_2x2": lambda: _brick(2, 2),
    "brick_2x4": lambda: _brick(4, 2),
    "plate_1x4": lambda: _brick(4, 1, _PLATE_H),
    "slope_45": lambda: _slope(2, 2),
    "round_1x1": lambda: _round(0.5, [(0, 0)]),
    "tile_2x2": lambda: _tile(2, 2),
    "arch_1x4": _arch,
    "cone": _cone,
    "wedge_plate": _wedge_plate,
    "technic_beam": _technic_beam,
    # extras, used when parts > 12
    "brick_1x4": lambda: _brick(4, 1),
    "plate_2x2": lambda: _brick(2, 2, _PLATE_H),
    "plate_1x2": lambda: _brick(2, 1, _PLATE_H),
    "brick_1x3": lambda: _brick(3, 1),
    "round_2x2": lambda: _round(1.0, _grid(2, 2)),
    "slope_2x1": lambda: _slope(1, 2),
    "tile_1x2": lambda: _tile(2, 1),
    "plate_2x4": lambda: _brick(4, 2, _PLATE_H),
}
PART_NAMES = list(_PART_BUILDERS)

# Pose limits for parts whose identity is hidden from some viewpoints:
# allowed yaw windows in degrees (0 = default orientation, front towards the
# camera) and the camera elevation range.
_POSE_LIMITS: dict[str, tuple[list[tuple[float, float]], tuple[float, float]]] = {
    "slope_45": ([(-65.0, -22.0), (22.0, 65.0)], (25.0, 55.0)),
    "slope_2x1": ([(-65.0, -22.0), (22.0, 65.0)], (25.0, 55.0)),
    "arch_1x4": ([(-50.0, 50.0), (130.0, 230.0)], (18.0, 45.0)),
}
_DEFAULT_POSE = ([(-32.0, 32.0), (148.0, 212.0)], (32.0, 60.0))
_PART_CACHE: dict[str, list[list[_Prim]]] = {}


def _part_geometry(name: str) -> list[list[_Prim]]:
    if name not in _PART_CACHE:
        _PART_CACHE[name] = _PART_BUILDERS[name]()
    return _PART_CACHE[name]


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

_SS = 2  # supersampling factor for the part layer
_REF_EXTENT = 5.0  # projected extent (stud units) of the biggest parts
_SIZE_REALISM = 0.6  # 0: every part fills the frame alike; 1: true relative size


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _draw_part(size: int, part: str, rgb, rng: np.random.Generator, fill_frac: float) -> Image.Image:
    """Render the part on a transparent RGBA canvas of ``size`` (supersampled internally)."""
    layers = _part_geometry(part)
    windows, (el0, el1) = _POSE_LIMITS.get(part, _DEFAULT_POSE)
    lo_deg, hi_deg = windows[int(rng.integers(len(windows)))]
    yaw = math.radians(rng.uniform(lo_deg, hi_deg))
    elev = math.radians(rng.uniform(el0, el1))
    roll = math.radians(rng.uniform(-12, 12))
    l_az = rng.uniform(0, 2 * math.pi)
    l_el = math.radians(rng.uniform(35, 75))
    light = np.array([math.cos(l_el) * math.cos(l_az), math.cos(l_el) * math.sin(l_az), math.sin(l_el)])
    view = np.array([0.0, math.cos(elev), -math.sin(elev)])  # camera looking direction
    up = np.array([0.0, math.sin(elev), math.cos(elev)])
    half = light - view
    half /= np.linalg.norm(half)
    R = _rot_z(yaw)
    cr, sr = math.cos(roll), math.sin(roll)

    def project(v: np.ndarray):
        w = v @ R.T
        sx = w[:, 0]
        sy = -(w @ up)
        return np.stack([cr * sx - sr * sy, sr * sx + cr * sy], axis=1), w @ view

    # bounding box of the whole part to normalise the scale
    allv = np.concatenate([f.verts for layer in layers for p in layer for f in p.faces])
    pts, _ = project(allv)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = float(max(hi - lo))
    S = size * _SS
    # Partly physical scale: bigger parts look bigger (as under a fixed camera),
    # but small parts still fill a fair share of the frame.
    scale = fill_frac * S / (extent ** (1 - _SIZE_REALISM) * _REF_EXTENT**_SIZE_REALISM)
    scale = min(scale, 0.92 * S / extent)
    span = (hi - lo) * scale
    margin = 0.04 * S
    off_x = rng.uniform(margin, max(margin, S - margin - span[0]) + 1e-6) - lo[0] * scale
    off_y = rng.uniform(margin, max(margin, S - margin - span[1]) + 1e-6) - lo[1] * scale

    base = np.asarray(rgb, dtype=np.float64)
    lum = float(base @ np.array([0.299, 0.587, 0.114]))
    ambient = rng.uniform(0.45, 0.55)
    canvas = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for layer in layers:
        order = sorted(layer, key=lambda p: -float(p.center @ R.T @ view))
        for prim in order:
            items = []
            for f in prim.faces:
                n = R @ f.normal
                if not f.decal and float(n @ view) > -0.03:
                    continue
                p2, depth = project(f.verts)
                items.append((-float(depth.mean()), f, n, p2))
            items.sort(key=lambda t: t[0])
            for _, f, n, p2 in items:
                if f.decal:
                    shade, spec = 1.0, 0.0
                else:
                    shade = ambient + (1.0 - ambient) * max(0.0, float(n @ light)) * 1.05
                    spec = 0.22 * max(0.0, float(n @ half)) ** 24
                col = base * shade * f.tone + spec * 255.0
                if lum < 70 and not f.decal:  # dark plastic: show the form through sheen
                    col = col + max(0.0, shade - ambient) * 70.0
                col = np.clip(col, 0, 255)
                fill = tuple(int(c) for c in col) + (255,)
                if f.smooth or f.decal:
                    edge = fill
                elif lum < 70:
                    edge = tuple(int(c) for c in np.clip(col + 38, 0, 255)) + (255,)
                else:
                    edge = tuple(int(c) for c in col * 0.72) + (255,)
                xy = [(float(x * scale + off_x), float(y * scale + off_y)) for x, y in p2]
                draw.polygon(xy, fill=fill, outline=edge, width=max(1, S // 320))
    return canvas.resize((size, size), Image.Resampling.BOX)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array([r, g, b]) * 255.0


def _bg_color(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    col = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.95))
    for _ in range(12):
        if np.linalg.norm(col - avoid) > 90:
            break
        col = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.95))
    return col


def _lowfreq(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = (rng.random((cells, cells)) * 255).astype(np.uint8)
    img = Image.fromarray(small, "L").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int, avoid, real: bool) -> np.ndarray:
    avoid = np.asarray(avoid, dtype=np.float64)
    c1 = _bg_color(rng, avoid)
    c2 = np.clip(c1 + rng.normal(0, 45 if real else 28, 3), 0, 255)
    if np.linalg.norm(c2 - avoid) < 70:
        c2 = c1
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    kinds = ["solid", "gradient", "noise", "stripes"] if real else ["solid", "gradient", "noise"]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "solid":
        t = np.zeros((size, size), np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = math.cos(a) * xx + math.sin(a) * yy
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    elif kind == "noise":
        t = _lowfreq(rng, size, int(rng.integers(3, 12)))
    else:  # wood-ish stripes (real only)
        a = rng.uniform(0, math.pi)
        warp = _lowfreq(rng, size, 5) * rng.uniform(1.0, 4.0)
        t = 0.5 + 0.5 * np.sin((math.cos(a) * xx + math.sin(a) * yy) * rng.uniform(8, 30) + warp)
    bg = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    grain = rng.uniform(1.0, 4.0) if not real else rng.uniform(3.0, 9.0)
    bg = bg + rng.normal(0, grain, (size, size, 1)).astype(np.float32)
    if real:  # a bit of clutter: faint blobs and lines
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
        overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        d = ImageDraw.Draw(overlay)
        for _ in range(int(rng.integers(2, 7))):
            col = tuple(int(v) for v in np.clip(c1 + rng.normal(0, 50, 3), 0, 255)) + (int(rng.integers(30, 90)),)
            x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
            w, h = rng.uniform(0.05, 0.4, 2) * size
            if rng.random() < 0.5:
                d.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
            else:
                d.line([x0, y0, x0 + w, y0 + h], fill=col, width=max(1, int(size * rng.uniform(0.005, 0.02))))
        img = Image.alpha_composite(img.convert("RGBA"), overlay.filter(ImageFilter.GaussianBlur(size * 0.006)))
        bg = np.asarray(img.convert("RGB"), dtype=np.float32)
    return bg.astype(np.float32)


def _render(part: str, rgb, size: int, real: bool, rng: np.random.Generator) -> tuple[Image.Image, int, int | None]:
    """Return (RGB image, final JPEG quality, optional pre-compression quality)."""
    fill = rng.uniform(0.66, 0.86)
    fg = _draw_part(size, part, rgb, rng, fill)
    bg = _background(rng, size, rgb, real)

    alpha_img = fg.getchannel("A")
    # soft drop shadow, offset away from the light
    shadow = Image.new("L", (size, size), 0)
    dx, dy = (rng.uniform(-0.04, 0.04, 2) * size).astype(int)
    shadow.paste(alpha_img, (int(dx), int(dy) + max(1, size // 80)))
    shadow = shadow.filter(ImageFilter.GaussianBlur(size * rng.uniform(0.01, 0.03)))
    sh = np.asarray(shadow, dtype=np.float32)[..., None] / 255.0
    bg *= 1.0 - rng.uniform(0.25, 0.5) * sh

    fga = np.asarray(fg, dtype=np.float32)
    a = fga[..., 3:4] / 255.0
    img = bg * (1 - a) + fga[..., :3] * a

    # lighting: brightness, contrast, directional shading gradient, white balance
    bright = rng.uniform(0.85, 1.15)
    contrast = rng.uniform(0.85, 1.15)
    img = (img - 128.0) * contrast + 128.0
    ga = rng.uniform(0, 2 * math.pi)
    g = rng.uniform(0.0, 0.15)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1) - 0.5
    grad = 1.0 + g * 2 * (math.cos(ga) * xx + math.sin(ga) * yy)
    tint = 1.0 + rng.normal(0, 0.015 if not real else 0.03, 3)
    if real:  # vignette
        r2 = xx**2 + yy**2
        grad = grad * (1.0 - rng.uniform(0.1, 0.3) * r2 * 2)
    img = img * (bright * grad)[..., None] * tint[None, None, :]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    blur = rng.uniform(0.0, 0.7) if not real else rng.uniform(0.4, 1.1)
    if blur > 0.25:
        pil = pil.filter(ImageFilter.GaussianBlur(blur * size / 256))
    sigma = rng.uniform(0.5, 3.0) if not real else rng.uniform(4.0, 9.0)
    arr = np.asarray(pil, dtype=np.float32) + rng.normal(0, sigma, (size, size, 3)).astype(np.float32)
    pil = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if real:
        quality = int(rng.integers(85, 89))
        pre = int(rng.integers(35, 60))
    else:
        quality = int(rng.integers(88, 93))
        pre = None
    return pil, quality, pre


def _jpeg_bytes(img: Image.Image, quality: int, pre: int | None = None) -> bytes:
    if pre is not None:  # simulate an earlier, harsher compression (real photos)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=pre)
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


# --------------------------------------------------------------------------
# Planning + output
# --------------------------------------------------------------------------


@dataclass
class DemoSummary:
    out_dir: Path
    csv_path: Path
    n_images: int
    parts: list[str]
    colors: list[str]
    planted: dict = field(default_factory=dict)


@dataclass
class _Item:
    part: str  # true part
    color: str  # true colour
    source: str
    group: str = ""
    seq: int = 0
    csv_part: str = ""
    csv_color: str = ""
    size: int = 0
    kind: str = "normal"  # normal | near_dup | truncated | not_image
    dup_of: int = -1
    dup_transform: str = ""

    @property
    def filename(self) -> str:
        return f"{self.group}_{self.seq}.jpg"


def _split_groups(n: int, rnd: random.Random) -> list[int]:
    sizes = []
    while n > 0:
        if n <= 4:
            s = n
        else:
            s = rnd.randint(2, min(4, n - 2))
        sizes.append(s)
        n -= s
    return sizes


def _near_duplicate(original: bytes, transform: str, rng: np.random.Generator) -> bytes:
    img = Image.open(io.BytesIO(original)).convert("RGB")
    w, h = img.size
    if transform == "requality":
        return _jpeg_bytes(img, int(rng.integers(70, 80)))
    if transform == "brightness":
        arr = np.asarray(img, dtype=np.float32) * rng.uniform(1.02, 1.05)
        return _jpeg_bytes(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), 90)
    # crop 1-2 % and resize back
    c = max(1, int(round(w * rng.uniform(0.01, 0.02))))
    img = img.crop((c, c, w - c, h - c)).resize((w, h), Image.Resampling.BICUBIC)
    return _jpeg_bytes(img, 90)


def generate_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    images_per_combo: int = 8,
    image_size: int = 256,
    parts: int = 12,
    colors: int = 8,
) -> DemoSummary:
    """Generate the demo photo set under ``out_dir`` and return a summary."""
    if not 1 <= parts <= len(PART_NAMES):
        raise ValueError(f"parts must be between 1 and {len(PART_NAMES)}")
    if not 1 <= colors <= len(COLOR_PALETTE):
        raise ValueError(f"colors must be between 1 and {len(COLOR_PALETTE)}")
    if images_per_combo < 1:
        raise ValueError("images_per_combo must be >= 1")
    if image_size < 32:
        raise ValueError("image_size must be >= 32")

    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    part_names = PART_NAMES[:parts]
    color_names = list(COLOR_PALETTE)[:colors]
    rnd = random.Random(seed)

    # 1. groups of the same physical part
    groups: list[tuple[str, str, int]] = []
    for p in part_names:
        for c in color_names:
            for s in _split_groups(images_per_combo, rnd):
                groups.append((p, c, s))
    rnd.shuffle(groups)
    n_real = round(_REAL_FRACTION * len(groups))
    real_idx = set(rnd.sample(range(len(groups)), n_real))

    items: list[_Item] = []
    for gi, (p, c, s) in enumerate(groups):
        source = "real" if gi in real_idx else "synthetic"
        for k in range(s):
            items.append(
                _Item(p, c, source, group=f"P{gi + 1:04d}", seq=k + 1, csv_part=p, csv_color=c, size=image_size)
            )
    n_groups = len(groups)
    base_count = len(items)

    # 2. choose disjoint sets of base images for the planted problems
    n_flip = max(1, round(_N_FLIP_FRACTION * base_count)) if parts > 1 else 0
    n_dup = _N_NEAR_DUPLICATES if parts > 1 else 0
    n_small = _N_SMALL
    n_unknown = max(1, round(_UNKNOWN_FRACTION * base_count))
    needed = n_flip + n_dup + n_small + n_unknown
    pool = rnd.sample(range(base_count), min(base_count, needed))
    flip_idx = pool[:n_flip]
    dup_idx = pool[n_flip : n_flip + n_dup]
    small_idx = pool[n_flip + n_dup : n_flip + n_dup + n_small]
    unknown_idx = pool[n_flip + n_dup + n_small :]

    for i in flip_idx:
        it = items[i]
        it.csv_part = rnd.choice([p for p in part_names if p != it.part])
    for i in small_idx:
        items[i].size = rnd.randint(160, 200)
    for i in unknown_idx:
        items[i].csv_color = UNKNOWN_COLOR

    def new_group() -> str:
        nonlocal n_groups
        n_groups += 1
        return f"P{n_groups:04d}"

    transforms = ["requality", "brightness", "crop"]
    for k, i in enumerate(dup_idx):
        o = items[i]
        wrong = rnd.choice([p for p in part_names if p != o.part])
        items.append(
            _Item(
                o.part,
                o.color,
                o.source,
                group=new_group(),
                seq=1,
                csv_part=wrong,
                csv_color=o.color,
                size=o.size,
                kind="near_dup",
                dup_of=i,
                dup_transform=transforms[k % len(transforms)],
            )
        )
    for kind in ("truncated", "not_image"):
        p, c = rnd.choice(part_names), rnd.choice(color_names)
        items.append(
            _Item(
                p,
                c,
                rnd.choice(["real", "synthetic"]),
                group=new_group(),
                seq=1,
                csv_part=p,
                csv_color=c,
                size=image_size,
                kind=kind,
            )
        )

    # 3. render
    data: list[bytes] = []
    for idx, it in enumerate(items):
        rng = np.random.default_rng([seed, 7919, idx])
        if it.kind == "near_dup":
            blob = _near_duplicate(data[it.dup_of], it.dup_transform, rng)
        elif it.kind == "not_image":
            text = (f"Loupe demo: this file is not an image (seed {seed}).\n").encode()
            blob = text + rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
        else:
            img, q, pre = _render(it.part, COLOR_PALETTE[it.color], it.size, it.source == "real", rng)
            blob = _jpeg_bytes(img, q, pre)
            if it.kind == "truncated":
                blob = blob[: int(len(blob) * 0.4)]
        data.append(blob)

    # 4. write files, CSV and planted.json (clear stale images from earlier runs)
    for old in img_dir.glob("*.jpg"):
        old.unlink()
    for it, blob in zip(items, data, strict=True):
        (img_dir / it.filename).write_bytes(blob)

    ordered = sorted(items, key=lambda t: (t.group, t.seq))
    csv_path = out_dir / "labels.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(CSV_HEADER)
        for it in ordered:
            w.writerow([it.filename, it.csv_part, it.csv_color, it.source, it.group])

    planted = {
        "seed": seed,
        "flipped_labels": [
            {"image_filename": items[i].filename, "true_part": items[i].part, "written_part": items[i].csv_part}
            for i in flip_idx
        ],
        "near_duplicates": [
            {
                "original": items[it.dup_of].filename,
                "duplicate": it.filename,
                "original_part": items[it.dup_of].csv_part,
                "duplicate_part": it.csv_part,
                "true_part": it.part,
                "transform": it.dup_transform,
            }
            for it in items
            if it.kind == "near_dup"
        ],
        "corrupt": [
            {"image_filename": it.filename, "kind": "truncated_jpeg" if it.kind == "truncated" else "not_an_image"}
            for it in items
            if it.kind in ("truncated", "not_image")
        ],
        "small_images": [
            {"image_filename": items[i].filename, "width": items[i].size, "height": items[i].size} for i in small_idx
        ],
        "unknown_color": [{"image_filename": items[i].filename, "true_color": items[i].color} for i in unknown_idx],
    }
    (out_dir / "planted.json").write_text(json.dumps(planted, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return DemoSummary(
        out_dir=out_dir,
        csv_path=csv_path,
        n_images=len(items),
        parts=part_names,
        colors=color_names,
        planted=planted,
    )
