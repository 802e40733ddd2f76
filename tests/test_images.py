"""Client image decoding: formats, modes, data URI variants, limits and every refusal, on real image bytes.

Non-alpha images must come out exactly as transformers' `load_image` (exif_transpose + convert("RGB")) gives them;
images with transparency are composited over white exactly as the Idefics3 processor's `convert_to_rgb` does.
"""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from transformers.image_utils import load_image
from transformers.models.idefics3.image_processing_idefics3 import convert_to_rgb as idefics3_convert_to_rgb

from edgevlm.runtime import images as images_module
from edgevlm.runtime.errors import ImageError, InvalidRequestError
from edgevlm.runtime.images import ImageLimits, check_image_count, decode_image, decode_images, to_rgb

RNG = np.random.default_rng(1234)


def noise(h: int, w: int, c: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, c), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{b64(data)}"


def hf(data: bytes) -> np.ndarray:
    """The Hugging Face reference: transformers.image_utils.load_image on the same base64."""
    return np.asarray(load_image(b64(data)))


def decoded(data: bytes, **kwargs) -> np.ndarray:
    image = decode_image(uri(data), **kwargs)
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    return np.asarray(image)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data: costs nothing to build."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def refused(source, message: str, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(source, **kwargs) if not isinstance(source, list) else decode_images(source, **kwargs)
    assert str(info.value) == message
    assert info.value.message == message
    assert info.value.param == "messages"
    assert isinstance(info.value, InvalidRequestError) and info.value.status == 400
    assert info.value.to_dict()["error"]["code"] == "invalid_image"
    return info.value


@pytest.fixture
def load_calls(monkeypatch) -> list:
    """Counts pixel decoding (ImageFile.load) so a test can prove a refusal came before it."""
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# --- formats ---


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_lossless_formats_round_trip_exactly(fmt):
    pixels = noise(23, 37)
    out = decoded(encode(Image.fromarray(pixels), fmt))
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize(
    "fmt,kwargs", [("JPEG", {"quality": 90}), ("WEBP", {"quality": 80}), ("WEBP", {"lossless": True})]
)
def test_lossy_formats_match_hf(fmt, kwargs):
    data = encode(Image.fromarray(noise(31, 17)), fmt, **kwargs)
    out = decoded(data)
    assert out.shape == (31, 17, 3)
    np.testing.assert_array_equal(out, hf(data))


def test_animated_gif_gives_first_frame():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (12, 9), c).convert("P") for c in colors]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decoded(data, limits=ImageLimits())
    assert out.shape == (9, 12, 3)
    assert (out == np.array(colors[0], dtype=np.uint8)).all()
    np.testing.assert_array_equal(out, hf(data))


def test_animated_webp_gives_first_frame():
    frames = [Image.new("RGB", (10, 6), c) for c in [(10, 200, 30), (250, 250, 0)]]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decoded(data)
    assert (out == np.array([10, 200, 30], dtype=np.uint8)).all()


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    out = decoded(data)
    assert out.shape == (40, 20, 3)  # height and width swapped
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 50  # the left (red) half is now on top
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 50
    np.testing.assert_array_equal(out, hf(data))


def test_tiff_is_not_an_accepted_format():
    data = encode(Image.fromarray(noise(8, 8)), "TIFF")
    assert Image.open(io.BytesIO(data)).format == "TIFF"  # Pillow itself would read it
    refused(uri(data), "image 1: unsupported or corrupt image data")


# --- modes ---


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("L", "JPEG"), ("P", "PNG"), ("P", "BMP"), ("1", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG")],
)
def test_modes_without_alpha_match_hf_convert_rgb(mode, fmt):
    base = Image.fromarray(noise(19, 27))
    if mode == "I;16":
        image = Image.fromarray(RNG.integers(0, 1024, (19, 27), dtype=np.uint16))
    elif mode == "P":
        image = base.quantize(colors=16)
    else:
        image = base.convert(mode)
    data = encode(image, fmt)
    stored = Image.open(io.BytesIO(data))
    assert stored.mode == mode or (mode == "I;16" and stored.mode in ("I", "I;16"))
    out = decoded(data)
    np.testing.assert_array_equal(out, hf(data))
    np.testing.assert_array_equal(out, np.asarray(stored.convert("RGB")))
    if mode == "I;16":  # Hugging Face (Pillow) clips 16-bit values at 255 rather than scaling them
        assert out.max() == 255 and (out[np.asarray(image) >= 255] == 255).all()


@pytest.mark.parametrize("fmt,kwargs", [("PNG", {}), ("WEBP", {"lossless": True})])
def test_rgba_is_composited_over_white_like_idefics3(fmt, kwargs):
    rgba = noise(21, 13, 4)
    rgba[0, 0, 3] = 0  # fully transparent: white
    rgba[0, 1, 3] = 255  # opaque: its own colour
    data = encode(Image.fromarray(rgba, "RGBA"), fmt, **kwargs)
    out = decoded(data)
    stored = np.asarray(Image.open(io.BytesIO(data)))
    expected = idefics3_convert_to_rgb(stored, input_data_format="channels_last")
    np.testing.assert_array_equal(out, expected)
    assert tuple(out[0, 0]) == (255, 255, 255)
    np.testing.assert_array_equal(out[0, 1], stored[0, 1, :3])


def test_compositing_in_bands_matches_idefics3_on_every_row(monkeypatch):
    """A large image is composited a band of rows at a time; band edges must not change a pixel."""
    import edgevlm.runtime.images as images

    monkeypatch.setattr(images, "_BAND_PIXELS", 3 * 13 + 5)  # bands of 3 rows, the last one shorter
    rgba = noise(22, 13, 4)
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    expected = idefics3_convert_to_rgb(np.asarray(Image.open(io.BytesIO(data))), input_data_format="channels_last")
    np.testing.assert_array_equal(decoded(data), expected)


def test_la_is_composited_over_white():
    la = noise(9, 11, 2)
    data = encode(Image.fromarray(la, "LA"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = decoded(data).astype(int)
    gray, alpha = la[..., 0].astype(float), la[..., 1].astype(float) / 255
    expected = gray * alpha + 255 * (1 - alpha)
    assert np.abs(out - expected[..., None]).max() <= 1
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_palette_transparency_is_composited_over_white():
    image = Image.new("P", (6, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    image.putpixel((0, 0), 0)
    data = encode(image, "PNG", transparency=0)
    out = decoded(data)
    assert tuple(out[0, 0]) == (255, 255, 255)  # the transparent index, not its black palette entry
    assert (out.reshape(-1, 3)[1:] == (200, 30, 40)).all()


def test_to_rgb_leaves_rgb_alone():
    image = Image.fromarray(noise(5, 5))
    assert to_rgb(image) is image


# --- data URI variants ---


def _payload_png() -> bytes:
    """A small PNG whose base64 has padding and both '+' and '/', so the variants below exercise them."""
    for height in range(5, 50):
        data = encode(Image.fromarray(noise(height, 5)), "PNG")
        text = b64(data)
        if text.endswith("=") and "+" in text and "/" in text:
            return data
    raise AssertionError("no suitable PNG")


PNG = _payload_png()
PNG_PIXELS = np.asarray(Image.open(io.BytesIO(PNG)).convert("RGB"))


def _wrapped(text: str) -> str:
    return "\n".join(text[i : i + 10] for i in range(0, len(text), 10))


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(f"data:image/png;base64,{b64(PNG)}", id="png"),
        pytest.param(f"data:image/jpeg;base64,{b64(PNG)}", id="declared-jpeg-content-png"),
        pytest.param(f"data:image/jpg;base64,{b64(PNG)}", id="jpg"),
        pytest.param(f"data:image/webp;base64,{b64(PNG)}", id="webp"),
        pytest.param(f"data:image/gif;base64,{b64(PNG)}", id="gif"),
        pytest.param(f"data:image/bmp;base64,{b64(PNG)}", id="bmp"),
        pytest.param(f"data:;base64,{b64(PNG)}", id="no-media-type"),
        pytest.param(f"DATA:IMAGE/PNG;BASE64,{b64(PNG)}", id="upper-case"),
        pytest.param(f"data:image/png;charset=utf-8;base64,{b64(PNG)}", id="extra-parameter"),
        pytest.param(b64(PNG), id="raw"),
        pytest.param(f"  \n{b64(PNG)}\n ", id="raw-padded-with-whitespace"),
        pytest.param(base64.encodebytes(PNG).decode(), id="mime-line-breaks"),
        pytest.param(f"data:image/png;base64,{_wrapped(b64(PNG))}", id="newlines"),
        pytest.param(
            "data:image/png;base64," + " \t\r\n ".join(b64(PNG)[i : i + 7] for i in range(0, len(b64(PNG)), 7)),
            id="mixed-whitespace",
        ),
        pytest.param(base64.urlsafe_b64encode(PNG).decode(), id="url-safe"),
        pytest.param(b64(PNG).rstrip("="), id="missing-padding"),
    ],
)
def test_data_uri_variants(source):
    np.testing.assert_array_equal(np.asarray(decode_image(source)), PNG_PIXELS)


def test_png_has_url_safe_characters_and_padding():
    # The variants above only prove something if the payload exercises them.
    text = b64(PNG)
    assert text.endswith("=") and "+" in text and "/" in text
    assert "-" in base64.urlsafe_b64encode(PNG).decode() and "_" in base64.urlsafe_b64encode(PNG).decode()


def test_decode_images_keeps_order():
    other = encode(Image.fromarray(noise(3, 4)), "PNG")
    out = decode_images([uri(PNG), b64(other)])
    np.testing.assert_array_equal(np.asarray(out[0]), PNG_PIXELS)
    assert out[1].size == (4, 3)


# --- refusals ---


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/cat.png",
        "https://example.com/cat.png",
        "HTTPS://EXAMPLE.COM/x",
        "file:///etc/passwd",
        "ftp://x/y.png",
    ],
)
def test_urls_are_refused(url):
    refused(url, "image 1: image URLs are not supported: send the image as a base64 data URI")


def test_bad_base64_names_the_image():
    refused([uri(PNG), "data:image/png;base64,@@not*base64@@"], "image 2: not valid base64")
    refused(b64(PNG)[:20] + "=" + b64(PNG)[20:], "image 1: not valid base64")  # padding in the middle
    refused("abcde", "image 1: not valid base64")  # a length no base64 can have


def test_corrupt_data_names_the_image():
    junk = b64(bytes(RNG.integers(0, 256, 300, dtype=np.uint8)))
    refused([uri(PNG), uri(PNG), f"data:image/png;base64,{junk}"], "image 3: unsupported or corrupt image data")
    refused(uri(PNG[: len(PNG) // 2]), "image 1: unsupported or corrupt image data")  # truncated
    refused(uri(b"GIF89a" + b"\0" * 3), "image 1: unsupported or corrupt image data")
    refused(uri(b"<svg xmlns='http://www.w3.org/2000/svg'/>"), "image 1: unsupported or corrupt image data")


def test_malformed_data_uris():
    refused("data:image/png;base64", "image 1: malformed data URI (no comma before the data)")
    refused("data:image/png,rawbytes", "image 1: data URI must be base64-encoded (data:image/png;base64,...)")
    supported = "(supported: png, jpeg, webp, gif, bmp)"
    refused(f"data:image/svg+xml;base64,{b64(PNG)}", f"image 1: unsupported image type 'image/svg+xml' {supported}")
    refused(f"data:text/plain;base64,{b64(PNG)}", f"image 1: unsupported image type 'text/plain' {supported}")
    refused("data:image/png;base64,", "image 1: empty image data")
    refused("data:image/png;base64, \n ", "image 1: empty image data")
    refused("", "image 1: empty image data")
    refused(None, "image 1: expected a base64 string, got NoneType")
    refused(PNG, "image 1: expected a base64 string, got bytes")


def test_encoded_size_limit_refuses_before_decoding_base64(monkeypatch):
    text = "A" * (25_300_000 * 4 // 3)  # 25.3 MB of zero bytes, in base64

    def no_decoding(*args, **kwargs):
        raise AssertionError("base64 was decoded")

    monkeypatch.setattr(images_module.base64, "b64decode", no_decoding)
    refused(f"data:image/png;base64,{text}", "image 1: 25.3 MB exceeds the 20 MB limit")


def test_encoded_size_limit_is_configurable_and_exact():
    limit = len(PNG)
    assert decode_image(uri(PNG), limits=ImageLimits(max_bytes=limit)).size == Image.open(io.BytesIO(PNG)).size
    message = f"image 1: {limit / 1e6:.6g} MB exceeds the {(limit - 1) / 1e6:.6g} MB limit"
    refused(uri(PNG), message, limits=ImageLimits(max_bytes=limit - 1))
    big = "A" * (20_000_004 * 4 // 3)  # just over the limit: must not read as "20 MB exceeds the 20 MB limit"
    refused(big, "image 1: 20.1 MB exceeds the 20 MB limit")


def test_pixel_limit_refuses_a_header_before_decoding(load_calls):
    refused(uri(png_header(8000, 8000)), "image 1: 8000×8000 exceeds the 40 MP limit")
    assert load_calls == []
    # The same bytes with a higher limit do reach the decoder (and fail there): the refusal above came first.
    higher = ImageLimits(max_pixels=10**8)
    refused(uri(png_header(8000, 8000)), "image 1: unsupported or corrupt image data", limits=higher)
    assert load_calls == [(8000, 8000)]


def test_pixel_limit_refuses_a_real_compressible_bomb(load_calls):
    data = encode(Image.new("L", (8000, 6000)), "PNG", compress_level=1)  # 48 MP in a few hundred KB
    assert len(data) < 1_000_000
    refused(uri(data), "image 1: 8000×6000 exceeds the 40 MP limit")
    assert load_calls == []


def test_pixel_limit_counts_width_times_height():
    image = encode(Image.fromarray(noise(10, 11)), "PNG")
    assert decode_image(uri(image), limits=ImageLimits(max_pixels=110)).size == (11, 10)
    refused(uri(image), "image 1: 11×10 exceeds the 0.000109 MP limit", limits=ImageLimits(max_pixels=109))


@pytest.mark.parametrize("side,megapixels", [(10_000, 100), (20_000, 400)])
def test_pillow_decompression_bomb_checks_are_refusals_too(side, megapixels, load_calls):
    # 100 MP trips Pillow's DecompressionBombWarning and 400 MP its DecompressionBombError, before our own check.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused(uri(png_header(side, side)), f"image 1: {megapixels} MP exceeds the 40 MP limit")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert load_calls == []


def test_too_many_images_is_checked_before_decoding():
    refused(["not an image"] * 20, "too many images: 20 (limit 16)")
    assert len(decode_images([uri(PNG)] * 16)) == 16
    with pytest.raises(ImageError, match=r"^too many images: 3 \(limit 2\)$"):
        check_image_count(3, ImageLimits(max_images=2))
    check_image_count(2, ImageLimits(max_images=2))


def test_limits_are_frozen_and_validated():
    limits = ImageLimits()
    assert (limits.max_bytes, limits.max_pixels, limits.max_images) == (20_000_000, 40_000_000, 16)
    with pytest.raises(AttributeError):
        limits.max_images = 3
    with pytest.raises(ValueError):
        ImageLimits(max_pixels=0)
