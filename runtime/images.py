"""Decode the images clients send (base64 data URIs) into RGB Pillow images, within limits.

We are offline by design: an image arrives inline as ``data:image/png;base64,...``, ``data:;base64,...`` or bare
base64 (standard or URL-safe alphabet, whitespace and line breaks tolerated); URLs are refused.

Decoding follows Hugging Face's ``transformers.image_utils.load_image``: EXIF orientation applied
(``ImageOps.exif_transpose``), first frame of an animation, then RGB. Modes without alpha convert with Pillow's
``convert("RGB")``, bit for bit what ``transformers.image_transforms.convert_to_rgb`` does (so ``I;16`` clips at
255 as it does there). Images with transparency (RGBA, LA, PA, or a ``transparency`` entry in a P/L/RGB image) are
composited over opaque white, exactly the way the Idefics3/SmolVLM processor's own ``convert_to_rgb`` does, instead
of dropping the alpha channel and showing whatever colour hides under transparent pixels.

Limits are checked before the work they guard: the encoded size before base64 decoding, the pixel count from the
header (``Image.open`` is lazy) before any pixel data is decompressed, the request's total pixels before each
image is decoded. Images are decoded one at a time (`iter_images`), so a request holds one full-size image at once;
compositing transparency works in bands of rows, so it adds little to the decoded image itself. Every failure is an
``ImageError`` whose message names the image by its 1-based position in the request.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Iterator, Sequence

from PIL import Image, ImageOps

from .errors import ImageError
from .limits import ImageLimits

__all__ = ["ImageLimits", "check_image_count", "decode_image", "decode_images", "iter_images", "to_rgb"]

# The formats we let Pillow try, by its plugin names: nothing else is even parsed (no EPS/Ghostscript, no TIFF...).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_MEDIA_TYPES = {"", "application/octet-stream"} | {
    f"image/{t}" for t in ("png", "jpeg", "jpg", "pjpeg", "webp", "gif", "bmp", "x-bmp", "x-ms-bmp", "apng")
}
_URL_MESSAGE = "image URLs are not supported: send the image as a base64 data URI"
_PARAM = "messages"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_URL_SAFE = str.maketrans("-_", "+/")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _error(index: int, what: str) -> ImageError:
    return ImageError(f"image {index}: {what}", param=_PARAM)


def _millions(n: int, *, up: bool = False) -> str:
    """n / 10**6 with one decimal ("25.3", "20"); `up` rounds up, so a size over a limit never reads as equal to it."""
    if n < 100_000:  # tiny limits (tests, embedded configs): exact
        return f"{n / 1e6:.6g}"
    tenths = -(-n // 100_000) if up else round(n / 100_000)
    return f"{tenths // 10}" if tenths % 10 == 0 else f"{tenths / 10:.1f}"


def check_image_count(n: int, limits: ImageLimits = ImageLimits()) -> None:
    """Refuse a request with more images than the limit (call it before decoding any)."""
    if n > limits.max_images:
        raise ImageError(f"too many images: {n} (limit {limits.max_images})", param=_PARAM)


def _payload(source: str, index: int) -> str:
    """The base64 text inside a data URI or bare base64 string; refuses URLs and non-image data URIs."""
    s = source.strip()
    if s[:5].lower() == "data:":
        header, comma, data = s[5:].partition(",")
        if not comma:
            raise _error(index, "malformed data URI (no comma before the data)")
        media_type, *params = (p.strip().lower() for p in header.split(";"))
        if "base64" not in params:
            raise _error(index, "data URI must be base64-encoded (data:image/png;base64,...)")
        if media_type not in _MEDIA_TYPES:
            raise _error(index, f"unsupported image type {media_type!r} (supported: png, jpeg, webp, gif, bmp)")
        return data
    if _SCHEME.match(s):  # base64 never contains ':', so this is some URL (http, https, file, ...)
        raise _error(index, _URL_MESSAGE)
    return s


def image_payload(source, index: int = 1) -> str:
    """The base64 text of one client image (data URI or bare base64), checked as `decode_image` checks it first:
    what the image cache keys on, without decoding anything."""
    if not isinstance(source, str):
        raise _error(index, f"expected a base64 string, got {type(source).__name__}")
    return _payload(source, index)


def _b64decode(text: str, index: int, limits: ImageLimits) -> bytes:
    data = "".join(text.split()).translate(_URL_SAFE)
    if not data:
        raise _error(index, "empty image data")
    # Refuse an oversized image from the text length, before allocating its decoded bytes.
    size = len(data.rstrip("=")) * 3 // 4
    if size > limits.max_bytes:
        raise _error(index, f"{_millions(size, up=True)} MB exceeds the {_millions(limits.max_bytes)} MB limit")
    if len(data) % 4:
        data += "=" * (-len(data) % 4)  # tolerate missing padding
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _error(index, "not valid base64") from None


def _bomb_message(exc: Exception) -> str:
    m = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{_millions(int(m.group(1)), up=True)} MP" if m else "image size"


_BAND_PIXELS = 1 << 20  # pixels composited at once: ~4 MB of RGBA temporaries whatever the image's size


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way Hugging Face does it: ``convert("RGB")``, except that transparency is composited over white.

    The composite is computed band by band: each pixel's arithmetic is the processor's (``alpha_composite`` of the
    RGBA pixel over opaque white, then RGB), but a 36 MP RGBA image needs one RGB result beside it instead of three
    more full-size RGBA copies (~430 MB).
    """
    if image.mode == "RGB":
        return image
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    width, height = rgba.size
    out = Image.new("RGB", rgba.size)
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        band = rgba.crop((0, top, width, min(top + rows, height)))
        background = Image.new("RGBA", band.size, (255, 255, 255))
        out.paste(Image.alpha_composite(background, band).convert("RGB"), (0, top))
    return out


def decode_image(source: str, index: int = 1, limits: ImageLimits = ImageLimits(), *,
                 pixels_left: int | None = None) -> Image.Image:
    """Decode one client image (data URI or bare base64) into an RGB image; `index` (1-based) names it in errors.

    `pixels_left` is what the request's total pixel limit leaves for this image (see `iter_images`).
    """
    if not isinstance(source, str):
        raise _error(index, f"expected a base64 string, got {type(source).__name__}")
    raw = _b64decode(_payload(source, index), index, limits)
    try:
        with warnings.catch_warnings():
            # Pillow warns past Image.MAX_IMAGE_PIXELS and raises past twice that; both are refusals here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=FORMATS)  # lazy: reads the header only
            width, height = image.size
            if width * height > limits.max_pixels:
                raise _error(index, f"{width}×{height} exceeds the {_millions(limits.max_pixels)} MP limit")
            if pixels_left is not None and width * height > pixels_left:
                raise _error(index, f"{width}×{height} takes the request's images past their total limit of "
                                    f"{_millions(limits.max_request_pixels)} MP")
            image.load()  # first frame of an animation
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _error(index, f"{_bomb_message(exc)} exceeds the {_millions(limits.max_pixels)} MP limit") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError, MemoryError) as exc:
        # Pillow signals unknown formats with UnidentifiedImageError (an OSError) and broken data with any of these.
        raise _error(index, "unsupported or corrupt image data") from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the image: keep it as stored
        pass
    try:
        return to_rgb(image)
    except (OSError, ValueError) as exc:
        raise _error(index, f"unsupported image mode {image.mode!r}") from exc


def iter_images(sources: Sequence[str], limits: ImageLimits = ImageLimits()) -> Iterator[Image.Image]:
    """Decode a request's images in order, one at a time, after checking their count.

    Each image is decoded only when the caller asks for the next one, so a caller that reduces each image before
    asking for the next holds one full-size image at a time. Every header is checked against what the request's
    total pixel limit leaves before its pixels are decoded.
    """
    check_image_count(len(sources), limits)
    left = limits.max_request_pixels
    for i, source in enumerate(sources, 1):
        image = decode_image(source, i, limits, pixels_left=left)
        left -= image.width * image.height
        yield image
        del image  # not held while the next one is decoded


def decode_images(sources: Sequence[str], limits: ImageLimits = ImageLimits()) -> list[Image.Image]:
    """All of a request's images, decoded in order (`iter_images` as a list)."""
    return list(iter_images(sources, limits))
