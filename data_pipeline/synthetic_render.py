"""Scene model of the synthetic visual task: layout, queries, misperception and drawing (PIL only).

A *scene* is a plain JSON-serialisable dict and drawing is a pure function of it, so the scene stored
with each question is enough to redraw its image and to re-derive its answer. All coordinates are
integer pixels, origin at the top-left corner, y growing downwards. Everything is deterministic given
the ``random.Random`` passed in. Question wording lives in ``data_pipeline.synthetic``.

Scene types:

- ``shapes``: ``{"type", "width", "height", "background": [r, g, b], "objects": [{"shape", "color",
  "cx", "cy", "r"}]}``. ``r`` is the circumradius: a circle has radius ``r``, a square half-side
  ``round(0.8 r)``, an upward triangle is inscribed in the circle of radius ``r``. The centre pixel
  ``(cx, cy)`` lies inside every shape and objects never overlap.
- ``chart``: ``{"type", "width", "height", "background", "max_value", "plot": [x0, y0, x1, y1],
  "bars": [{"label", "value", "color", "box": [x0, top, x1, bottom]}]}``: bars stand on the baseline
  ``plot[3]``, one light grid line per unit, ``bottom - top == round(value * unit)`` with
  ``unit = (plot[3] - plot[1]) / max_value``. Boxes are inclusive pixel ranges.
- ``digit``: ``{"type", "width", "height", "background", "digit", "color", "box": [x0, y0, x1, y1],
  "thickness"}``: one seven-segment digit (font-independent, so PNG bytes do not depend on the
  installed fonts or FreeType version).

A *filter* ``{"color": str | None, "shape": str | None}`` selects objects; ``None`` is a wildcard.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Callable

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (245, 245, 240), (238, 242, 248))
GRID_COLOR = (205, 205, 205)
AXIS_COLOR = (0, 0, 0)
# Area / r^2: circle pi, square (1.6)^2 (half-side 0.8 r), inscribed triangle 3*sqrt(3)/4.
_AREA_PER_R2 = {"circle": math.pi, "square": 2.56, "triangle": 3 * math.sqrt(3) / 4}
MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 4096
CHART_MAX_VALUE = 10

# Seven-segment encoding: a top, b upper right, c lower right, d bottom, e lower left, f upper left,
# g middle.
SEGMENT_NAMES = {
    "a": "top",
    "b": "upper right",
    "c": "lower right",
    "d": "bottom",
    "e": "lower left",
    "f": "upper left",
    "g": "middle",
}
DIGIT_SEGMENTS: dict[int, str] = {
    0: "abcdef",
    1: "bc",
    2: "abdeg",
    3: "abcdg",
    4: "bcfg",
    5: "acdfg",
    6: "acdefg",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}


def matches(obj: dict, flt: dict) -> bool:
    """Whether an object satisfies a filter."""
    return flt["color"] in (None, obj["color"]) and flt["shape"] in (None, obj["shape"])


def count_matching(objects: list[dict], flt: dict) -> int:
    """Number of objects satisfying a filter."""
    return sum(matches(o, flt) for o in objects)


def fill_filter(rng: random.Random, flt: dict) -> dict:
    """A concrete ``{"color", "shape"}`` satisfying the filter (wildcards drawn at random)."""
    return {"color": flt["color"] or rng.choice(tuple(COLORS)), "shape": flt["shape"] or rng.choice(SHAPES)}


def object_area(obj: dict) -> float:
    """Geometric area in square pixels (what "largest" means to a viewer, not the radius)."""
    return _AREA_PER_R2[obj["shape"]] * obj["r"] ** 2


def radius_for_area(shape: str, area: float) -> int:
    """Smallest integer circumradius whose ``shape`` paints more than ``area`` square pixels."""
    return math.floor(math.sqrt(area / _AREA_PER_R2[shape])) + 1


def unique_max(items: list[dict], key: Callable[[dict], float]) -> dict | None:
    """The item with the strictly largest ``key(item)``; None on a tie."""
    ranked = sorted(items, key=key, reverse=True)
    return ranked[0] if len(ranked) == 1 or key(ranked[0]) > key(ranked[1]) else None


def side_of(obj: dict, scene: dict, axis: str) -> str:
    """'left'/'right' (axis 'horizontal') or 'top'/'bottom' (axis 'vertical') half of the centre."""
    if axis == "horizontal":
        return "left" if obj["cx"] < scene["width"] / 2 else "right"
    return "top" if obj["cy"] < scene["height"] / 2 else "bottom"


def object_size_range(width: int, height: int) -> tuple[int, int]:
    """Smallest and largest ordinary object circumradius in pixels for an image of this size."""
    side = min(width, height)
    low = max(3, round(0.05 * side))
    return low, max(low, round(0.085 * side))


def place_objects(
    rng: random.Random,
    specs: list[tuple[str, str, int, str | None]],
    width: int,
    height: int,
    *,
    max_tries: int = 300,
) -> list[dict] | None:
    """Place non-overlapping objects at random; ``None`` when the layout does not fit.

    Args:
        specs: ``(shape, color, r, region)`` per object; ``r`` in pixels, ``region`` one of
            ``None``, ``"left"``, ``"right"``, ``"top"``, ``"bottom"``: the whole object (not only its
            centre) then lies strictly inside that half of the image.
    Returns:
        Object dicts ``{"shape", "color", "cx", "cy", "r"}`` in the order of ``specs``.
    """
    gap = max(2, round(0.02 * min(width, height)))
    edge = max(1, gap // 2)
    # Place big objects first: they are the hardest to fit.
    order = sorted(range(len(specs)), key=lambda i: -specs[i][2])
    placed: dict[int, dict] = {}
    for index in order:
        shape, color, r, region = specs[index]
        x_lo, x_hi = edge + r, width - 1 - edge - r
        y_lo, y_hi = edge + r, height - 1 - edge - r
        if region == "left":
            x_hi = min(x_hi, width // 2 - 1 - r)
        elif region == "right":
            x_lo = max(x_lo, (width + 1) // 2 + r)
        elif region == "top":
            y_hi = min(y_hi, height // 2 - 1 - r)
        elif region == "bottom":
            y_lo = max(y_lo, (height + 1) // 2 + r)
        if x_lo > x_hi or y_lo > y_hi:
            return None
        for _ in range(max_tries):
            cx, cy = rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi)
            if all(
                math.hypot(cx - o["cx"], cy - o["cy"]) >= r + o["r"] + gap for o in placed.values()
            ):
                placed[index] = {"shape": shape, "color": color, "cx": cx, "cy": cy, "r": r}
                break
        else:
            return None
    return [placed[i] for i in range(len(specs))]


def shapes_scene(
    rng: random.Random,
    combos: list[dict],
    width: int,
    height: int,
    *,
    regions: list[str | None] | None = None,
    radii: list[int] | None = None,
) -> dict | None:
    """Shapes scene with one object per ``{"color", "shape"}`` in ``combos``; None if they do not fit.

    ``radii`` (pixels) default to random ordinary sizes; ``regions`` are as in ``place_objects``.
    Objects are stored in random order so a question's target is not always the first one.
    """
    low, high = object_size_range(width, height)
    specs = [(c["shape"], c["color"], radii[i] if radii else rng.randint(low, high),
              regions[i] if regions else None) for i, c in enumerate(combos)]
    objects = place_objects(rng, specs, width, height)
    if objects is None:
        return None
    rng.shuffle(objects)
    return {"type": "shapes", "width": width, "height": height,
            "background": list(rng.choice(BACKGROUNDS)), "objects": objects}


def layout_chart(
    rng: random.Random, values: list[int], width: int, height: int
) -> dict:
    """Chart scene for bars ``values`` (each in 1..CHART_MAX_VALUE), labelled A, B, ... left to right."""
    x0, x1 = round(0.12 * width), width - 1 - round(0.05 * width)
    y0, y1 = round(0.06 * height), height - 1 - round(0.10 * height)
    unit = (y1 - y0) / CHART_MAX_VALUE
    slot = (x1 - x0) / len(values)
    bars = []
    for i, value in enumerate(values):
        centre = x0 + (i + 0.5) * slot
        half = max(2, round(0.3 * slot))
        top = y1 - round(value * unit)
        bars.append(
            {
                "label": "ABCD"[i],
                "value": value,
                "color": rng.choice(sorted(COLORS)),
                # The bar covers rows top..y1-1 so the baseline axis row y1 stays visible.
                "box": [round(centre) - half, top, round(centre) + half, y1],
            }
        )
    return {
        "type": "chart",
        "width": width,
        "height": height,
        "background": list(rng.choice(BACKGROUNDS)),
        "max_value": CHART_MAX_VALUE,
        "plot": [x0, y0, x1, y1],
        "bars": bars,
    }


def layout_digit(rng: random.Random, digit: int, width: int, height: int) -> dict:
    """Digit scene: one seven-segment digit 40-70% of the image height at a random place."""
    side = min(width, height)
    digit_h = rng.randint(round(0.4 * side), round(0.7 * side))
    digit_w = max(6, round(0.55 * digit_h))
    thickness = max(2, round(0.14 * digit_w))
    margin = max(2, round(0.04 * side))
    x0 = rng.randint(margin, width - margin - digit_w)
    y0 = rng.randint(margin, height - margin - digit_h)
    return {
        "type": "digit",
        "width": width,
        "height": height,
        "background": list(rng.choice(BACKGROUNDS)),
        "digit": digit,
        "color": rng.choice(sorted(COLORS)),
        "box": [x0, y0, x0 + digit_w - 1, y0 + digit_h - 1],
        "thickness": thickness,
    }


def _segments_differ(a: int, b: int) -> int:
    return len(set(DIGIT_SEGMENTS[a]) ^ set(DIGIT_SEGMENTS[b]))


# Digits one or two segments away (7 <-> 1, 8 <-> 0, ...): the plausible misreadings of a digit.
CONFUSABLE_DIGITS = {d: [e for e in range(10) if e != d and _segments_differ(d, e) <= 2]
                     for d in range(10)}


def misperceive(rng: random.Random, scene: dict, filters: list[dict]) -> dict:
    """A copy of ``scene`` as a careless reader might see it: one or two perception mistakes.

    Shapes: a missed, extra, recoloured, reshaped, mirrored or enlarged object, biased towards the
    objects selected by ``filters`` (the ones the question is about). Charts: a misread bar value
    (+-1 or 2 units) or two neighbouring values swapped. Digits: a digit one or two segments away.
    The copy may make the question ill-posed (e.g. no unique target); callers check.
    """
    seen = json.loads(json.dumps(scene))
    for _ in range(1 if rng.random() < 0.7 else 2):
        if seen["type"] == "digit":
            seen["digit"] = rng.choice(CONFUSABLE_DIGITS[seen["digit"]])
        elif seen["type"] == "chart" and rng.random() < 0.5:
            i = rng.randrange(len(seen["bars"]) - 1)
            a, b = seen["bars"][i], seen["bars"][i + 1]
            a["value"], b["value"] = b["value"], a["value"]
        elif seen["type"] == "chart":
            bar = rng.choice(seen["bars"])
            bar["value"] = min(CHART_MAX_VALUE - 1, max(1, bar["value"] + rng.choice((-2, -1, 1, 2))))
        else:
            _misperceive_objects(rng, seen, filters)
    return seen


def _misperceive_objects(rng: random.Random, scene: dict, filters: list[dict]) -> None:
    objects = scene["objects"]
    relevant = [o for o in objects if any(matches(o, f) for f in filters)]
    obj = rng.choice(relevant if relevant and rng.random() < 0.6 else objects)
    # Grid scenes (synthetic_grid) are read as counts of squares by colour: only those can be misread.
    grid = scene.get("layout") == "grid"
    mistake = rng.choice(("miss", "extra", "color") if grid else ("miss", "extra", "color", "shape", "side", "size"))
    if mistake == "miss" and len(objects) > 1:
        objects.remove(obj)
    elif mistake == "extra":
        wanted = rng.choice(filters) if filters and rng.random() < 0.7 else {"color": None, "shape": None}
        extra = fill_filter(rng, wanted)
        if grid:
            extra["shape"] = "square"
        objects.append({**extra, "cx": rng.randrange(scene["width"]),
                        "cy": rng.randrange(scene["height"]), "r": obj["r"]})
    elif mistake == "color":
        obj["color"] = rng.choice([c for c in COLORS if c != obj["color"]])
    elif mistake == "shape":
        obj["shape"] = rng.choice([s for s in SHAPES if s != obj["shape"]])
    elif mistake == "side":
        obj["cx"], obj["cy"] = scene["width"] - 1 - obj["cx"], scene["height"] - 1 - obj["cy"]
    elif mistake == "size":
        obj["r"] = radius_for_area(obj["shape"], max(object_area(o) for o in objects))


def segment_boxes(box: list[int], thickness: int) -> dict[str, tuple[int, int, int, int]]:
    """Inclusive pixel rectangles of the seven segments inside a digit ``box``."""
    x0, y0, x1, y1 = box
    t = thickness
    ym = (y0 + y1) // 2
    return {
        "a": (x0, y0, x1, y0 + t - 1),
        "b": (x1 - t + 1, y0, x1, ym),
        "c": (x1 - t + 1, ym, x1, y1),
        "d": (x0, y1 - t + 1, x1, y1),
        "e": (x0, ym, x0 + t - 1, y1),
        "f": (x0, y0, x0 + t - 1, ym),
        "g": (x0, ym - t // 2, x1, ym - t // 2 + t - 1),
    }


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict) -> None:
    cx, cy, r = obj["cx"], obj["cy"], obj["r"]
    fill = COLORS[obj["color"]]
    if obj["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj["shape"] == "square":
        h = round(0.8 * r)
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        dx = 0.866 * r
        draw.polygon([(cx, cy - r), (cx - dx, cy + 0.5 * r), (cx + dx, cy + 0.5 * r)], fill=fill)


def _draw_chart(draw: ImageDraw.ImageDraw, scene: dict) -> None:
    x0, y0, x1, y1 = scene["plot"]
    unit = (y1 - y0) / scene["max_value"]
    for k in range(1, scene["max_value"] + 1):
        y = y1 - round(k * unit)
        draw.line((x0, y, x1, y), fill=GRID_COLOR, width=1)
    for bar in scene["bars"]:
        bx0, top, bx1, bottom = bar["box"]
        draw.rectangle((bx0, top, bx1, bottom - 1), fill=COLORS[bar["color"]])
    axis_w = max(1, min(scene["width"], scene["height"]) // 112)
    draw.line((x0, y1, x1, y1), fill=AXIS_COLOR, width=axis_w)
    draw.line((x0, y0, x0, y1), fill=AXIS_COLOR, width=axis_w)


def render_scene(scene: dict) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``scene["width"] x scene["height"]`` pixels."""
    image = Image.new("RGB", (scene["width"], scene["height"]), tuple(scene["background"]))
    draw = ImageDraw.Draw(image)
    if scene["type"] == "shapes":
        for obj in scene["objects"]:
            _draw_object(draw, obj)
    elif scene["type"] == "chart":
        _draw_chart(draw, scene)
    elif scene["type"] == "digit":
        boxes = segment_boxes(scene["box"], scene["thickness"])
        for name in DIGIT_SEGMENTS[scene["digit"]]:
            draw.rectangle(boxes[name], fill=COLORS[scene["color"]])
    else:
        raise ValueError(f"unknown scene type {scene['type']!r}: expected shapes, chart or digit")
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding with fixed options (no metadata, fixed compression), so bytes are reproducible."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
