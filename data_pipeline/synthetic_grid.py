"""Grid questions of the synthetic task: equal squares on an 8 x 8 grid, counted by colour.

The shapes questions (``synthetic_questions``) draw objects of random sizes anywhere, so how many red
objects there are is not a function of how much red the image holds; a from-scratch model whose
language model has not yet learned to attend to single image tokens (the demo's, after minutes of
CPU training) reads only colour amounts and guesses the rest (docs/demo_notes.md). Grid scenes make
colour amounts informative: every object is a square of one size centred in its own cell, and a cell
of an 8 x 8 grid over a 224-px image is exactly one image token of the demo model (14-px patches,
2 x 2 pixel unshuffle). Counting, adding, subtracting and existence then ask the model to read
counts off the amount of each colour, a perception it can acquire in minutes, and to reason on them.

Grid scenes are ordinary ``shapes`` scenes (rendering, answers, reasoning and misperception are
shared); only the layout differs. The question kinds (``GRID_KINDS``) reuse the shapes query ops.
"""

from __future__ import annotations

import random

from data_pipeline.synthetic_render import BACKGROUNDS, COLORS

__all__ = ["GRID_CELLS", "GRID_KINDS", "GRID_SAMPLERS", "grid_reasoning", "grid_scene"]

GRID_CELLS = 8  # cells per side; 8 x 8 = the demo model's 64 image tokens at 224 px
GRID_KINDS = ("grid_count", "grid_sum", "grid_total_minus", "grid_exist")
GRID_MATCH_MODES = {"grid_count": "number", "grid_sum": "number", "grid_total_minus": "number",
                    "grid_exist": "yesno"}
_COLOR_ORDER = tuple(COLORS)
MAX_GRID_OBJECTS = 12


def grid_scene(rng: random.Random, colors: list[str], width: int, height: int) -> dict:
    """Shapes scene with one square per entry of ``colors``, each centred in a distinct grid cell.

    Every square has the same circumradius (its side is about 0.7 of the smaller cell side), so each
    colour's painted area is proportional to its count. Objects are stored in random order.
    """
    if len(colors) > GRID_CELLS * GRID_CELLS:
        raise ValueError(f"{len(colors)} squares do not fit on a {GRID_CELLS} x {GRID_CELLS} grid")
    cell_w, cell_h = width / GRID_CELLS, height / GRID_CELLS
    # Square half-side round(0.8 r) = 0.35 of the cell: a visible gap separates neighbours.
    r = max(2, round(0.35 * min(cell_w, cell_h) / 0.8))
    cells = rng.sample(range(GRID_CELLS * GRID_CELLS), len(colors))
    objects = [
        {"shape": "square", "color": color,
         "cx": int((cell % GRID_CELLS + 0.5) * cell_w), "cy": int((cell // GRID_CELLS + 0.5) * cell_h), "r": r}
        for color, cell in zip(colors, cells)
    ]
    return {"type": "shapes", "layout": "grid", "width": width, "height": height,
            "background": list(rng.choice(BACKGROUNDS)), "objects": objects}


def grid_reasoning(scene: dict, query: dict, answer: str) -> str:
    """Reasoning about a grid scene: the squares of every colour counted, then the question's step.

    Each count comes right after its colour ("red 3, green 0, ..."), so when a model writes a count it
    has already named the colour it is counting; the colours are always listed in one order.
    """
    counts = {c: sum(o["color"] == c and o["shape"] == "square" for o in scene["objects"]) for c in _COLOR_ORDER}
    text = "Squares by color: " + ", ".join(f"{c} {n}" for c, n in counts.items()) + "."
    op = query["op"]
    if op == "count":
        color = query["filter"]["color"]
        return text + f" The {color} count is {answer}."
    if op == "sum":
        first, second = (f["color"] for f in query["filters"])
        return text + f" {first.capitalize()} {counts[first]} + {second} {counts[second]} = {answer}."
    if op == "total_minus":
        color = query["filter"]["color"]
        total = sum(counts.values())
        return text + (f" Total {' + '.join(str(n) for n in counts.values())} = {total}, "
                       f"minus {color} {counts[color]} = {answer}.")
    if op == "exist":
        color = query["filter"]["color"]
        return text + f" {color.capitalize()} {counts[color]}, so the answer is {answer.lower()}."
    raise ValueError(f"grid scenes have no reasoning for query op {op!r}")


def _squares(color: str) -> dict:
    return {"color": color, "shape": "square"}


def _others(rng: random.Random, avoid: tuple[str, ...], n: int) -> list[str]:
    pool = [c for c in _COLOR_ORDER if c not in avoid]
    return [rng.choice(pool) for _ in range(n)]


def _sample_grid_count(rng, width, height):
    color = rng.choice(_COLOR_ORDER)
    n = rng.randint(1, 6)
    colors = [color] * n + _others(rng, (color,), rng.randint(0, MAX_GRID_OBJECTS - 6))
    flt = _squares(color)
    return grid_scene(rng, colors, width, height), {"op": "count", "filter": flt}, \
        f"How many {color} squares are there?", None


def _sample_grid_sum(rng, width, height):
    first, second = rng.sample(_COLOR_ORDER, 2)
    n1, n2 = rng.randint(1, 4), rng.randint(1, 4)
    colors = [first] * n1 + [second] * n2 + _others(rng, (first, second), rng.randint(0, 4))
    query = {"op": "sum", "filters": [_squares(first), _squares(second)]}
    text = f"What is the number of {first} squares plus the number of {second} squares?"
    return grid_scene(rng, colors, width, height), query, text, None


def _sample_grid_total_minus(rng, width, height):
    color = rng.choice(_COLOR_ORDER)
    colors = [color] * rng.randint(1, 4) + _others(rng, (color,), rng.randint(1, 6))
    text = f"How many squares are there in total minus the number of {color} squares?"
    return grid_scene(rng, colors, width, height), {"op": "total_minus", "filter": _squares(color)}, text, None


def _sample_grid_exist(rng, width, height):
    color = rng.choice(_COLOR_ORDER)
    # At most 2 targets: a wrong reading (one or two mistakes) must be able to miss them all.
    colors = [color] * rng.randint(1, 2) if rng.random() < 0.5 else []
    colors += _others(rng, (color,), rng.randint(2, 8))
    text = f"Is there a {color} square in the image?"
    return grid_scene(rng, colors, width, height), {"op": "exist", "filter": _squares(color)}, text, None


GRID_SAMPLERS = {"grid_count": _sample_grid_count, "grid_sum": _sample_grid_sum,
                 "grid_total_minus": _sample_grid_total_minus, "grid_exist": _sample_grid_exist}
