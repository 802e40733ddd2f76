"""Synthetic coloured-shape images and their question/answer pairs, for the bundled demo model.

Pure Pillow/numpy/stdlib (importable without torch). Everything is drawn from a `random.Random(seed)`, so a seed
fixes the images, the questions and the answers.

An image holds 1–3 shapes (circle, square, triangle, star) in 8 colours, each in one of 5 position zones (left,
right, top, bottom, center; two shapes never share a zone nor overlap), on a light, dark or textured background,
at a random size and aspect ratio, sometimes with JPEG artefacts. A shape covers ≥ ~2–3 patches of the model's
96 px tile in each direction. A (colour, shape) pair appears at most once per image, so "the red circle" always
names one shape.

Question types (`QTYPES`): shape, colour, colour-of-named-shape, count, position, describe, small talk. Each has ≥ 5
phrasings, including exactly the ones in the issue; answers are short fixed templates.

One more type, "json" (`JSON_QTYPE`, kept out of `QTYPES` so that `eval_samples` and the benchmark's old question
types stay exactly as they were): asked about an image with one shape ("Answer in JSON.", …), the answer is the
compact JSON object `{"shape":"circle","color":"red","count":1}` — keys in that order, no spaces, no leading space:
exactly what the server's constrained decoding (runtime/grammar.py) lets through for a schema listing shape, color
and count. The generator never draws two shapes of the same shape and colour, so there is no multi-shape JSON.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 165, 50),
    "blue": (30, 80, 225),
    "purple": (140, 45, 185),
    "black": (15, 15, 15),
    "white": (248, 248, 248),
}
COLOR_NAMES = tuple(COLORS)
# Zone centres as fractions of (width, height); the description lists shapes in this (reading) order.
ZONES = {"left": (0.18, 0.5), "top": (0.5, 0.18), "center": (0.5, 0.5), "bottom": (0.5, 0.82), "right": (0.82, 0.5)}
ZONE_ORDER = tuple(ZONES)
ZONE_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "center": "in the center"}

QTYPES = ("shape", "colour", "colour_of_shape", "count", "position", "describe", "smalltalk")

Q_SHAPE = (
    "What shape is in the image?",
    "What shape is this?",
    "Which shape do you see?",
    "What is the shape in the picture?",
    "Name the shape in the image.",
    "What kind of shape is shown?",
)
Q_COLOUR = (
    "What color is the shape?",
    "What colour is the shape?",
    "Which color is the shape?",
    "What is the color of the shape?",
    "Tell me the color of the shape.",
    "What color does the shape have?",
)
Q_COLOUR_OF = (
    "What color is the {shape}?",
    "What colour is the {shape}?",
    "Which color is the {shape}?",
    "What is the color of the {shape}?",
    "Tell me the color of the {shape}.",
    "What color does the {shape} have?",
)
Q_COUNT = (
    "How many shapes are there?",
    "How many shapes are in the image?",
    "Count the shapes.",
    "How many objects are there?",
    "What is the number of shapes?",
    "How many shapes do you see?",
)
Q_POSITION = (
    "Where is the {color} {shape}?",
    "Where is the {color} {shape} located?",
    "In which part of the image is the {color} {shape}?",
    "Where can I find the {color} {shape}?",
    "What is the position of the {color} {shape}?",
    "Where is the {color} {shape} in the image?",
)
Q_DESCRIBE = (
    "Describe the image.",
    "What is in the image?",
    "What do you see?",
    "Describe this picture.",
    "What does the image show?",
    "Describe what you see.",
)
Q_JSON = (
    "Answer in JSON.",
    "Describe the shape as JSON.",
    "Reply with JSON: shape, color and count.",
    "What is in the image? Answer with a JSON object.",
    "Give me the shape, color and count as JSON.",
    "Answer with JSON.",
    "Describe the image in JSON.",
    "Return a JSON object with the shape, color and count.",
)
JSON_QTYPE = "json"
JSON_KEYS = ("shape", "color", "count")

SMALLTALK = (
    "Hello",
    "Hello!",
    "Hi",
    "Hi there!",
    "Hey",
    "Good morning",
    "What can you do?",
    "Who are you?",
    "What are you?",
    "Help",
    "Can you help me?",
    "What is your name?",
    "How are you?",
    "Tell me about yourself.",
)
SMALLTALK_ANSWER = "I am a small demo model that describes shapes and colours in images."
# Image questions asked without an image.
NO_IMAGE_ANSWER = "Please send an image with your question."

# Tile side of the model (the processor resizes every image to one such square tile).
TILE = 96


@dataclass
class Shape:
    kind: str
    color: str
    zone: str
    cx: float  # centre, fractions of width / height
    cy: float
    r: float  # radius, fraction of min(width, height)
    angle: float  # degrees

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass
class Scene:
    width: int
    height: int
    background: str  # light / dark / textured-light / textured-dark
    shapes: list[Shape]
    jpeg_quality: int | None
    image: Image.Image | None = None
    labels: np.ndarray | None = field(default=None, repr=False)  # (12, 12) int: 0 = background, i+1 = shapes[i]


@dataclass
class QA:
    qtype: str
    question: str
    answer: str


# --- answers ---


def article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def describe(shapes: list[Shape]) -> str:
    ordered = sorted(shapes, key=lambda s: ZONE_ORDER.index(s.zone))
    names = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.name}" for s in ordered]
    if len(names) == 1:
        text = names[0]
    elif len(names) == 2:
        text = f"{names[0]} and {names[1]}"
    else:
        text = ", ".join(names[:-1]) + f" and {names[-1]}"
    return text[0].upper() + text[1:] + "."


def count_answer(n: int) -> str:
    return "There is 1 shape." if n == 1 else f"There are {n} shapes."


def position_answer(shape: Shape) -> str:
    return f"The {shape.name} is {ZONE_PHRASE[shape.zone]}."


def json_answer(shape: str, color: str, count: int = 1) -> str:
    """Compact JSON, keys in the order shape, color, count (as constrained decoding emits it)."""
    return f'{{"shape":"{shape}","color":"{color}","count":{count}}}'


# --- drawing ---


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float, sx: float, sy: float) -> list[tuple]:
    """Vertices in pixels; (sx, sy) scale fractions to pixels, r is scaled by min(w, h)."""
    if kind == "square":
        pts = [(math.cos(math.radians(45 + 90 * i)), math.sin(math.radians(45 + 90 * i))) for i in range(4)]
        scale = r * 1.2
    elif kind == "triangle":
        pts = [(math.cos(math.radians(-90 + 120 * i)), math.sin(math.radians(-90 + 120 * i))) for i in range(3)]
        scale = r * 1.3
    elif kind == "star":
        pts = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.42
            a = math.radians(-90 + 36 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        scale = r * 1.35
    else:
        raise ValueError(kind)
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    m = min(sx, sy)
    out = []
    for x, y in pts:
        x, y = x * ca - y * sa, x * sa + y * ca
        out.append((cx * sx + x * scale * m, cy * sy + y * scale * m))
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, w: int, h: int, fill) -> None:
    if s.kind == "circle":
        m = min(w, h) * s.r
        x, y = s.cx * w, s.cy * h
        draw.ellipse([x - m, y - m, x + m, y + m], fill=fill)
    else:
        draw.polygon(_polygon(s.kind, s.cx, s.cy, s.r, s.angle, w, h), fill=fill)


def _jitter(rgb, rng: random.Random, amount: int) -> tuple:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(w: int, h: int, kind: str, rng: random.Random) -> Image.Image:
    light = kind.endswith("light")
    if light:
        base = rng.randint(200, 250)
        rgb = tuple(max(0, min(255, base + rng.randint(-12, 5))) for _ in range(3))
    else:
        base = rng.randint(25, 70)
        rgb = tuple(max(0, min(255, base + rng.randint(-10, 10))) for _ in range(3))
    img = Image.new("RGB", (w, h), rgb)
    if not kind.startswith("textured"):
        return img
    arr = np.asarray(img).astype(np.int16)
    nrng = np.random.default_rng(rng.getrandbits(32))
    style = rng.choice(("noise", "stripes", "checker", "gradient"))
    amp = rng.randint(10, 22)
    yy, xx = np.mgrid[0:h, 0:w]
    if style == "noise":
        block = rng.choice((1, 2, 4))
        small = nrng.integers(-amp, amp + 1, size=(h // block + 1, w // block + 1, 1))
        delta = np.repeat(np.repeat(small, block, 0), block, 1)[:h, :w]
    elif style == "stripes":
        period = rng.randint(4, 14)
        direction = rng.choice(((1, 0), (0, 1), (1, 1), (1, -1)))
        phase = ((xx * direction[0] + yy * direction[1]) // period) % 2
        delta = (phase * 2 - 1)[..., None] * (amp // 2)
    elif style == "checker":
        period = rng.randint(5, 16)
        phase = ((xx // period) + (yy // period)) % 2
        delta = (phase * 2 - 1)[..., None] * (amp // 2)
    else:
        delta = ((xx / max(w - 1, 1) - 0.5) * 2 * amp)[..., None] * np.ones((1, 1, 3))
    arr = np.clip(arr + delta, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _place_shapes(rng: random.Random, n: int, background: str, w: int, h: int) -> list[Shape] | None:
    zones = rng.sample(ZONE_ORDER, n)
    allowed = [c for c in COLOR_NAMES if not (background.endswith("light") and c == "white")
               and not (background.endswith("dark") and c == "black")]
    pairs: set[tuple[str, str]] = set()
    shapes: list[Shape] = []
    m = min(w, h)
    for zone in zones:
        for _ in range(100):
            kind, color = rng.choice(SHAPES), rng.choice(allowed)
            if (kind, color) not in pairs:
                break
        pairs.add((kind, color))
        zx, zy = ZONES[zone]
        lo, hi = (0.10, 0.20) if n == 1 else (0.10, 0.13)
        for _ in range(200):
            r = rng.uniform(lo, hi)
            cx, cy = zx + rng.uniform(-0.03, 0.03), zy + rng.uniform(-0.03, 0.03)
            # inside the image (extent in fractions of each side) and apart from the others (in pixels)
            ex, ey = r * m / w * 1.4, r * m / h * 1.4
            if not (ex < cx < 1 - ex and ey < cy < 1 - ey):
                continue
            if all(math.hypot((cx - o.cx) * w, (cy - o.cy) * h) > (r + o.r) * m * 1.1 + 2 for o in shapes):
                break
        else:
            return None
        angle = rng.uniform(-15, 15) if kind != "circle" else 0.0
        shapes.append(Shape(kind, color, zone, cx, cy, r, angle))
    return shapes


def make_scene(rng: random.Random, n_shapes: int | None = None) -> Scene:
    """A random scene, rendered: the RGB image at its own size and a 12×12 label grid at patch centres."""
    if n_shapes is None:
        n_shapes = rng.choice((1, 1, 2, 2, 3, 3))
    side = rng.randint(64, 320)
    aspect = math.exp(rng.uniform(math.log(0.7), math.log(1.45)))  # width / height
    if aspect >= 1:
        w, h = side, max(32, int(side / aspect))
    else:
        w, h = max(32, int(side * aspect)), side
    background = rng.choice(("light", "light", "dark", "textured-light", "textured-dark"))
    image = _background(w, h, background, rng)
    shapes = _place_shapes(rng, n_shapes, background, w, h)
    if shapes is None:  # no room for these zones at this aspect ratio: draw another scene
        return make_scene(rng, n_shapes)
    draw = ImageDraw.Draw(image)
    label = Image.new("L", (w, h), 0)
    ldraw = ImageDraw.Draw(label)
    for i, s in enumerate(shapes):
        _draw_shape(draw, s, w, h, _jitter(COLORS[s.color], rng, 14))
        _draw_shape(ldraw, s, w, h, i + 1)
    quality = rng.choice((None, None, rng.randint(30, 90)))
    if quality is not None:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        image = Image.open(buf).convert("RGB")
    grid = TILE // 8
    labels = np.asarray(label.resize((grid, grid), Image.NEAREST)).astype(np.int64)
    return Scene(w, h, background, shapes, quality, image, labels)


# --- questions ---


def questions_for(scene: Scene, rng: random.Random, qtype: str) -> QA:
    shapes = scene.shapes
    if qtype == "shape":
        assert len(shapes) == 1
        s = shapes[0]
        return QA(qtype, rng.choice(Q_SHAPE), f"{article(s.kind)} {s.kind}.")
    if qtype == "colour":
        assert len(shapes) == 1
        return QA(qtype, rng.choice(Q_COLOUR), f"It is {shapes[0].color}.")
    if qtype == "colour_of_shape":
        kinds = [s.kind for s in shapes]
        unique = [s for s in shapes if kinds.count(s.kind) == 1]
        s = rng.choice(unique)
        return QA(qtype, rng.choice(Q_COLOUR_OF).format(shape=s.kind), f"The {s.kind} is {s.color}.")
    if qtype == "count":
        return QA(qtype, rng.choice(Q_COUNT), count_answer(len(shapes)))
    if qtype == "position":
        s = rng.choice(shapes)
        return QA(qtype, rng.choice(Q_POSITION).format(color=s.color, shape=s.kind), position_answer(s))
    if qtype == "describe":
        return QA(qtype, rng.choice(Q_DESCRIBE), describe(shapes))
    if qtype == JSON_QTYPE:
        assert len(shapes) == 1
        s = shapes[0]
        return QA(qtype, rng.choice(Q_JSON), json_answer(s.kind, s.color, 1))
    raise ValueError(qtype)


def valid_qtypes(scene: Scene) -> list[str]:
    kinds = [s.kind for s in scene.shapes]
    out = ["count", "position", "describe"]
    if len(scene.shapes) == 1:
        out += ["shape", "colour", JSON_QTYPE]
    if any(kinds.count(k) == 1 for k in kinds):
        out.append("colour_of_shape")
    return out


def smalltalk(rng: random.Random) -> QA:
    return QA("smalltalk", rng.choice(SMALLTALK), SMALLTALK_ANSWER)


def no_image_question(rng: random.Random) -> QA:
    """An image question asked without an image (trained, reported under small talk)."""
    q = rng.choice(Q_SHAPE + Q_COLOUR + Q_COUNT + Q_DESCRIBE)
    return QA("smalltalk", q, NO_IMAGE_ANSWER)


@dataclass
class Sample:
    qtype: str
    question: str
    answer: str
    scene: Scene | None  # None: text only


def eval_samples(seed: int, n: int) -> list[Sample]:
    """`n` held-out samples, balanced over `QTYPES` (each type n/7), from `seed`."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for i in range(n):
        qtype = QTYPES[i % len(QTYPES)]
        if qtype == "smalltalk":
            qa = smalltalk(rng)
            out.append(Sample(qa.qtype, qa.question, qa.answer, None))
            continue
        n_shapes = 1 if qtype in ("shape", "colour") else rng.choice((1, 2, 3))
        scene = make_scene(rng, n_shapes)
        while qtype not in valid_qtypes(scene):
            scene = make_scene(rng, n_shapes)
        qa = questions_for(scene, rng, qtype)
        out.append(Sample(qa.qtype, qa.question, qa.answer, scene))
    return out


def json_eval_samples(seed: int, n: int) -> list[Sample]:
    """`n` held-out JSON questions, each about a one-shape image, from `seed`."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for _ in range(n):
        scene = make_scene(rng, 1)
        qa = questions_for(scene, rng, JSON_QTYPE)
        out.append(Sample(qa.qtype, qa.question, qa.answer, scene))
    return out


def corpus_texts() -> list[str]:
    """Every question and answer text the generator can produce (for the tokenizer)."""
    texts = list(Q_SHAPE + Q_COLOUR + Q_COUNT + Q_DESCRIBE + SMALLTALK) + [SMALLTALK_ANSWER, NO_IMAGE_ANSWER]
    for kind in SHAPES:
        texts.append(f"{article(kind)} {kind}.")
        texts += [q.format(shape=kind) for q in Q_COLOUR_OF]
        for color in COLOR_NAMES:
            texts.append(f"It is {color}.")
            texts.append(f"The {kind} is {color}.")
            texts += [q.format(color=color, shape=kind) for q in Q_POSITION]
            for zone in ZONE_ORDER:
                texts.append(position_answer(Shape(kind, color, zone, 0, 0, 0, 0)))
            texts.append(describe([Shape(kind, color, "left", 0, 0, 0, 0)]))
            texts.append(describe([Shape(kind, color, "left", 0, 0, 0, 0), Shape("star", "orange", "top", 0, 0, 0, 0),
                                   Shape("circle", "red", "right", 0, 0, 0, 0)]))
    texts += [count_answer(n) for n in (1, 2, 3)]
    # JSON answers: compact, as constrained decoding emits them (weighted: they are few but all alike).
    texts += list(Q_JSON)
    texts += [json_answer(kind, color, 1) for kind in SHAPES for color in COLOR_NAMES] * 3
    return texts


def normalise(text: str) -> str:
    """Light normalisation for exact-match scoring."""
    return " ".join(text.strip().lower().replace("colour", "color").split())


if __name__ == "__main__":
    for s in eval_samples(0, 14):
        print(s.qtype, "|", s.question, "|", s.answer, "|", s.scene and (s.scene.width, s.scene.height))
