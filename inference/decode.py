"""Safe decoding of uploaded image bytes (pure Python, no Django): format sniffing for error messages, the media
type of stored photos, the decoded size read from the header, and reduced-size JPEG decoding.

Public API::

    class ImageError(ValueError)
    sniff_media_type(data: bytes) -> "image/jpeg" | "image/png" | "image/webp" | None
    decode_image(data: bytes, *, max_pixels=40_000_000, max_side_hint=None) -> PIL.Image.Image
    decoded_size(data: bytes, *, max_pixels=40_000_000, max_side_hint=None) -> (width, height)  (header only)
    oriented_size(data: bytes, *, max_pixels=40_000_000) -> (width, height) at full size, EXIF orientation applied
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from training.engine.data import to_rgb

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


class ImageError(ValueError):
    """The uploaded bytes are not a usable image; the message says why in words a person can act on."""


def _sniff(data: bytes) -> str:
    head = bytes(data[:32])
    if head.startswith(b"GIF8"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis"):
            return "HEIC/HEIF (e.g. an iPhone photo: export or share it as JPEG)"
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return f"an ISO media file ({brand.decode('latin-1')!r})"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith(b"\xff\xd8"):
        return "a damaged JPEG"
    if head.startswith(b"\x89PNG"):
        return "a damaged PNG"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a damaged WebP"
    stripped = head.lstrip()
    if stripped[:1] in (b"<", b"{", b"["):
        return "text (HTML/XML/SVG/JSON), not a picture"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"text starting with {head[:16].decode('ascii')!r}"
    return f"unrecognised data starting with 0x{head[:8].hex()}"


def sniff_media_type(data: bytes) -> str | None:
    """image/jpeg, image/png or image/webp from the file's magic bytes; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _sniff_ext(data: bytes) -> str:
    """The file extension for stored photo bytes (.jpg, .png, .webp; .bin when unknown)."""
    return {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp"}.get(sniff_media_type(data), ".bin")


def _open_image(data: bytes, *, max_pixels: int, max_side_hint: int | None) -> Image.Image:
    """Open (header only) and check the bytes; JPEGs get their reduced decoding scale (draft) set, so img.size is
    the size that load() will decode. The caller closes the image."""
    if data is None or len(data) == 0:
        raise ImageError("image is empty (0 bytes)")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        raise ImageError(f"image is not a JPEG/PNG/WebP (got {_sniff(data)})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image has too many pixels to process safely ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any parser error is a bad upload
        raise ImageError(
            f"image is truncated or corrupt and cannot be read ({type(exc).__name__}: {exc}); upload the complete file"
        ) from None
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"image has an invalid size {w}x{h}")
        if w * h > max_pixels:
            raise ImageError(
                f"image is too large: {w}x{h} = {w * h / 1e6:.1f} megapixels, the limit is "
                f"{max_pixels / 1e6:g} megapixels; resize it and try again"
            )
        if max_side_hint and img.format == "JPEG":
            img.draft("RGB", (int(max_side_hint), int(max_side_hint)))
    except BaseException:
        img.close()
        raise
    return img


def decoded_size(data: bytes, *, max_pixels: int = 40_000_000, max_side_hint: int | None = None) -> tuple[int, int]:
    """(width, height) that decode_image(data, same arguments) decodes, read from the header without decoding:
    the full size for PNG and WebP (their decoders cannot scale), the draft scale for JPEG. Raises ImageError
    like decode_image for data that is not a usable image. For a request-wide pixel budget."""
    img = _open_image(data, max_pixels=max_pixels, max_side_hint=max_side_hint)
    try:
        return img.size
    finally:
        img.close()


def oriented_size(data: bytes, *, max_pixels: int = 40_000_000) -> tuple[int, int]:
    """(width, height) of the full-size photo as decode_image orients it (EXIF rotations by 90 degrees swap the
    sides), read from the header. Raises ImageError like decode_image."""
    img = _open_image(data, max_pixels=max_pixels, max_side_hint=None)
    try:
        w, h = img.size
        try:
            turned = img.getexif().get(0x0112) in (5, 6, 7, 8)
        except Exception:  # noqa: BLE001 - a broken EXIF block: decode_image ignores it as well
            turned = False
        return (h, w) if turned else (w, h)
    finally:
        img.close()


def _reduce_factor(size: tuple[int, int], min_side: int) -> int:
    """The largest integer factor that keeps both sides >= min_side (1: no reduction)."""
    return max(1, min(size) // max(1, int(min_side)))


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, max_side_hint: int | None = None) -> Image.Image:
    """Validate and decode uploaded bytes into an RGB PIL image (EXIF orientation applied, transparency
    composited onto white).

    Raises ImageError for: empty data, data that is not a JPEG/PNG/WebP, more than `max_pixels` pixels (checked
    from the header, before decoding), and truncated/corrupt files (the image is fully loaded; truncated
    images are never accepted). With `max_side_hint`, JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8)
    that keeps both sides >= max_side_hint: pass the model's input size for fast, low-memory decoding. PNG and
    WebP cannot be decoded at a reduced scale; they are box-reduced by the largest integer factor that keeps
    both sides >= max_side_hint right after decoding, so only one full-size copy exists, briefly."""
    img = _open_image(data, max_pixels=max_pixels, max_side_hint=max_side_hint)
    try:
        w, h = img.size
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated data, broken chunks, decoder errors
            raise ImageError(
                f"image is truncated or corrupt: the {img.format} {w}x{h} data cannot be fully decoded "
                f"({type(exc).__name__}: {exc}); upload the complete file"
            ) from None
        factor = _reduce_factor(img.size, max_side_hint) if max_side_hint else 1
        if factor > 1 and img.format != "JPEG":
            if img.mode not in ("RGB", "RGBA", "L", "LA"):  # P, 1, I;16...: Pillow cannot box-reduce these
                return to_rgb(img).reduce(factor)
            small = img.reduce(factor)
            small.info = dict(img.info)  # the EXIF orientation, for to_rgb
            return to_rgb(small)
        return to_rgb(img)
    finally:
        img.close()
