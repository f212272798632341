"""A synthetic VQA task whose answers need the image: coloured shapes on a 3x3 grid.

Why synthetic: no model hub or data set can be downloaded here, and VTW's accuracy can
only be judged on a model that really reads its vision tokens. Every answer below is a
function of the scene, and the scene is drawn into the image only, so a model that
answers well must carry the image's information into the text tokens.

A sample is fully determined by its seed (``random.Random(seed)``): the scene, the image
(336x336 px, so the LLaVA-1.5 processor gives 24x24 = 576 vision tokens; each grid cell is
8x8 patches of 14 px) and the questions. Training uses seeds ``[0, HELD_OUT_SEED)``, the
held-out split seeds from ``HELD_OUT_SEED`` on.

Question types (one-word or two-word answers):

- ``colour``: "What colour is the shape at the top left?" -> "red"
- ``count``: "How many red shapes are there?" -> "two" (zero..four)
- ``exist``: POPE-style "Is there a blue circle?" -> "yes"/"no"; half the negatives share
  the colour or the shape with an object in the scene (the "adversarial" POPE split).
- ``position``: "Where is the green square?" -> "top left" (asked only when unique)

Cells are named row word then column word ("top middle", "middle left", "centre").
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 336
GRID = 3
CELL = IMAGE_SIZE // GRID  # 112 px = 8 patches of 14 px
HELD_OUT_SEED = 1_000_000
QUESTION_TYPES = ("colour", "count", "exist", "position")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 160, 40),
    "blue": (35, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 45, 175),
}
SHAPES = ("circle", "square", "triangle")
# Cell (row, col) -> name; the question says "at the {name}". Row word then column word,
# so a name is the composition of its two parts ("top" always means the top row).
POSITIONS = (
    ("top left", "top middle", "top right"),
    ("middle left", "centre", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUND = (235, 235, 235)
MIN_OBJECTS, MAX_OBJECTS = 2, 5


@dataclass(frozen=True)
class Obj:
    """One shape in one grid cell."""

    shape: str
    colour: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    type: str


@dataclass(frozen=True)
class Scene:
    """The objects of one image; the image is rendered from this and nothing else."""

    objects: tuple[Obj, ...]
    seed: int

    def render(self) -> Image.Image:
        return render(self)


def make_scene(rng: random.Random, seed: int = -1) -> Scene:
    """2-5 shapes in distinct cells, colours and shapes drawn uniformly."""
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), n)
    objects = tuple(
        Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), c // GRID, c % GRID)
        for c in sorted(cells)
    )
    return Scene(objects, seed)


def render(scene: Scene) -> Image.Image:
    """Draw the scene: a light grey canvas, each shape ~80 px inside its 112 px cell.

    The shape's size and offset jitter by a few pixels, derived from the scene seed and
    the cell only, so the same scene always gives the same image.
    """
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = random.Random(scene.seed * 31 + obj.row * GRID + obj.col)
        half = jitter.randint(34, 42)
        cx = obj.col * CELL + CELL // 2 + jitter.randint(-6, 6)
        cy = obj.row * CELL + CELL // 2 + jitter.randint(-6, 6)
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill)
    return image


def answer(scene: Scene, qtype: str, colour: str = "", shape: str = "", pos: str = "") -> str:
    """The ground truth of a question, computed from the scene (also used by the tests)."""
    objs = scene.objects
    if qtype == "colour":
        (obj,) = [o for o in objs if o.position == pos]
        return obj.colour
    if qtype == "count":
        return NUMBER_WORDS[sum(o.colour == colour for o in objs)]
    if qtype == "exist":
        return "yes" if any(o.colour == colour and o.shape == shape for o in objs) else "no"
    if qtype == "position":
        (obj,) = [o for o in objs if o.colour == colour and o.shape == shape]
        return obj.position
    raise ValueError(f"unknown question type {qtype!r}")


def make_question(scene: Scene, qtype: str, rng: random.Random) -> QA:
    """One question of ``qtype`` about ``scene``, with balanced answers where it matters."""
    objs = scene.objects
    if qtype == "colour":
        pos = rng.choice(objs).position
        q = f"What colour is the shape at the {pos}?"
        return QA(q, answer(scene, qtype, pos=pos), qtype)
    if qtype == "count":
        present = sorted({o.colour for o in objs})
        absent = sorted(set(COLOURS) - set(present))
        # Mostly colours that are present (counts 1..4), else an absent one (zero).
        pool = present if (rng.random() < 0.75 or not absent) else absent
        colour = rng.choice(pool)
        q = f"How many {colour} shapes are there?"
        return QA(q, answer(scene, qtype, colour=colour), qtype)
    if qtype == "exist":
        pairs = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            colour, shape = rng.choice(sorted(pairs))
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
            # Adversarial negatives share a colour or a shape with a present object.
            hard = [p for p in absent if any(p[0] == c or p[1] == s for c, s in pairs)]
            colour, shape = rng.choice(hard if (hard and rng.random() < 0.5) else absent)
        q = f"Is there a {colour} {shape}?"
        return QA(q, answer(scene, qtype, colour=colour, shape=shape), qtype)
    if qtype == "position":
        pairs = [(o.colour, o.shape) for o in objs]
        unique = sorted(p for p in set(pairs) if pairs.count(p) == 1)
        colour, shape = rng.choice(unique)  # sample_scene() guarantees one
        q = f"Where is the {colour} {shape}?"
        return QA(q, answer(scene, qtype, colour=colour, shape=shape), qtype)
    raise ValueError(f"unknown question type {qtype!r}")


def has_unique_object(scene: Scene) -> bool:
    pairs = [(o.colour, o.shape) for o in scene.objects]
    return any(pairs.count(p) == 1 for p in pairs)


def sample_scene(seed: int) -> tuple[Scene, random.Random]:
    """The scene of ``seed`` (re-drawn until it has a unique object for position questions)
    and the generator, positioned to draw that sample's questions."""
    rng = random.Random(seed)
    while True:
        scene = make_scene(rng, seed)
        if has_unique_object(scene):
            return scene, rng


def make_sample(seed: int, qtype: str | None = None) -> tuple[Scene, QA]:
    """The sample of ``seed``: a scene and one question (type ``qtype``, else by seed)."""
    scene, rng = sample_scene(seed)
    qtype = qtype or QUESTION_TYPES[seed % len(QUESTION_TYPES)]
    return scene, make_question(scene, qtype, rng)


def make_dialogue(seed: int, turns: int) -> tuple[Scene, list[QA]]:
    """A scene with ``turns`` questions of shuffled types, for multi-turn training (as in
    LLaVA-1.5's instruction data: one image, several questions, amortising the image)."""
    scene, rng = sample_scene(seed)
    types = [QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(turns)]
    rng.shuffle(types)
    qas: list[QA] = []
    for t in types:
        for _ in range(10):  # avoid asking the same question twice in one dialogue
            qa = make_question(scene, t, rng)
            if qa.question not in {x.question for x in qas}:
                break
        qas.append(qa)
    return scene, qas


def held_out(n: int, start: int = 0) -> list[tuple[Scene, QA]]:
    """``n`` held-out samples, question types cycling colour/count/exist/position."""
    return [make_sample(HELD_OUT_SEED + start + i) for i in range(n)]


def normalise(text: str) -> str:
    """Lower case, no punctuation or extra spaces, number words as digits ("Two." -> "2"),
    British/US spellings merged; exact match is then taken on the result."""
    text = re.sub(r"[^a-z0-9 ]", " ", text.lower().replace("</s>", " "))
    words = [str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w for w in text.split()]
    text = " ".join(words)
    return text.replace("center", "centre").replace("color", "colour").replace("gray", "grey")


def is_correct(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def describe(scene: Scene) -> str:
    """A text description of the scene, e.g. for logs and the tests' consistency checks."""
    return "; ".join(f"{o.colour} {o.shape} at the {o.position}" for o in scene.objects)
