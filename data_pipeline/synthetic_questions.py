"""Questions of the synthetic visual task: sampling, ground truth, options and chain-of-thought text.

A question is drawn on a fresh scene (``synthetic_render``) together with a ``query`` from which
its answer is re-derived (``answer_from_scene``); ``cot_answer`` writes templated reasoning about the
true scene (correct) or a misperceived one (plausibly wrong, internally consistent), and
``cot_prompt`` wraps a question in the MMPR chain-of-thought instruction. File writing lives in
``data_pipeline.synthetic``.
"""

from __future__ import annotations

import random

from data_pipeline.synthetic_grid import GRID_KINDS, GRID_MATCH_MODES, GRID_SAMPLERS, grid_reasoning
from data_pipeline.synthetic_render import (
    CHART_MAX_VALUE,
    COLORS,
    DIGIT_SEGMENTS,
    SEGMENT_NAMES,
    SHAPES,
    count_matching,
    fill_filter,
    layout_chart,
    layout_digit,
    matches,
    misperceive,
    object_area,
    object_size_range,
    radius_for_area,
    shapes_scene,
    side_of,
    unique_max,
)

__all__ = ["ALL_KINDS", "COT_PROMPT", "GRID_KINDS", "KIND_SETS", "KINDS", "LETTERS", "MATCH_MODES", "answer_from_scene", "bare_question",
           "cot_answer", "cot_prompt", "options_block", "sample_question"]

# REFERENCE.md section 4, step 2: the MMPR chain-of-thought instruction.
COT_PROMPT = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, and "
    'when you\'re ready to answer, please use the format "Final answer: .."\n\nQuestion:\n\n{question}'
)
KINDS = ("count", "color", "exist", "arithmetic", "position", "shape", "chart_tallest",
         "chart_value", "digit")
MATCH_MODES = {"count": "number", "color": "choice", "exist": "yesno", "arithmetic": "number",
               "position": "choice", "shape": "exact", "chart_tallest": "choice",
               "chart_value": "number", "digit": "number", **GRID_MATCH_MODES}
ALL_KINDS = KINDS + GRID_KINDS
# Named kind sets for generate_task(kinds=...): "mixed" is the default task, "grid" the counting task
# whose amounts of colour a from-scratch model can read (data_pipeline.synthetic_grid).
KIND_SETS = {"mixed": KINDS, "grid": GRID_KINDS}
LETTERS = "ABCD"
COLOR_ORDER = tuple(COLORS)  # red, green, blue, yellow: the order descriptions list groups in
MAX_OBJECTS = 8


# ---------------------------------------------------------------- filters and phrases

def _phrase(flt: dict, n: int = 2) -> str:
    """'red circles', 'circles', 'red shapes' (singular when n == 1)."""
    noun = (flt["shape"] or "shape") + ("" if n == 1 else "s")
    return f"{flt['color']} {noun}" if flt["color"] else noun


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _random_filter(rng: random.Random, mode: str) -> dict:
    """mode 'both' (colour and shape), 'shape' or 'color' (the other field is a wildcard)."""
    return {"color": rng.choice(COLOR_ORDER) if mode != "shape" else None,
            "shape": rng.choice(SHAPES) if mode != "color" else None}


def _distractor(rng: random.Random, avoid: list[dict]) -> dict:
    """A concrete object matching none of ``avoid``; half the time a near miss of ``avoid[0]``."""
    if rng.random() < 0.5:
        keep = rng.choice(("color", "shape"))
        combo = fill_filter(rng, {"color": None, "shape": None, keep: avoid[0][keep]})
    else:
        combo = fill_filter(rng, {"color": None, "shape": None})
    while any(matches(combo, f) for f in avoid):
        combo = fill_filter(rng, {"color": None, "shape": None})
    return combo


def options_block(record: dict) -> str:
    """The options of a choice record as lines '\\nA. text' (empty string when it has none)."""
    return "".join(f"\n{LETTERS[i]}. {text}" for i, text in enumerate(record.get("options") or []))


# ---------------------------------------------------------------- question samplers

def _sample_count(rng, width, height):
    flt = _random_filter(rng, rng.choice(("both", "both", "shape", "color")))
    n = rng.randint(1, 6)
    combos = [fill_filter(rng, flt) for _ in range(n)]
    combos += [_distractor(rng, [flt]) for _ in range(rng.randint(int(n < 3), MAX_OBJECTS - n))]
    query = {"op": "count", "filter": flt}
    return shapes_scene(rng, combos, width, height), query, f"How many {_phrase(flt)} are there?", None


def _sample_color(rng, width, height):
    options = list(COLOR_ORDER)
    rng.shuffle(options)
    if rng.random() < 0.5:
        flt = {"color": None, "shape": rng.choice(SHAPES)}
        combos = [fill_filter(rng, flt)] + [_distractor(rng, [flt]) for _ in range(rng.randint(1, 5))]
        scene = shapes_scene(rng, combos, width, height)
        return scene, {"op": "color_of", "filter": flt}, f"What color is the only {flt['shape']}?", options
    low, high = object_size_range(width, height)
    combos = [fill_filter(rng, {"color": None, "shape": None}) for _ in range(rng.randint(2, 6))]
    # The largest paints at least twice the area any ordinary object can, so it is unambiguous.
    big = radius_for_area(combos[0]["shape"], 2 * object_area({"shape": "circle", "r": high}))
    radii = [big] + [rng.randint(low, high) for _ in combos[1:]]
    scene = shapes_scene(rng, combos, width, height, radii=radii)
    return scene, {"op": "color_of_largest"}, "What color is the largest shape?", options


def _sample_exist(rng, width, height):
    flt = _random_filter(rng, "both")
    combos = [dict(flt) for _ in range(rng.randint(1, 2))] if rng.random() < 0.5 else []
    combos += [_distractor(rng, [flt]) for _ in range(rng.randint(2, 5))]
    scene = shapes_scene(rng, combos, width, height)
    return scene, {"op": "exist", "filter": flt}, f"Is there a {_phrase(flt, 1)} in the image?", None


def _sample_arithmetic(rng, width, height):
    if rng.random() < 0.5:
        flt = _random_filter(rng, rng.choice(("shape", "color")))
        combos = [fill_filter(rng, flt) for _ in range(rng.randint(1, 3))]
        combos += [_distractor(rng, [flt]) for _ in range(rng.randint(1, 5))]
        text = f"How many shapes are there in total minus the number of {_phrase(flt)}?"
        return shapes_scene(rng, combos, width, height), {"op": "total_minus", "filter": flt}, text, None
    mode = rng.choice(("both", "shape", "color"))
    first = _random_filter(rng, mode)
    second = first
    while second == first:  # same mode + different value = disjoint sets of objects
        second = _random_filter(rng, mode)
    n1, n2 = rng.randint(1, 3), rng.randint(1, 3)
    combos = [fill_filter(rng, first) for _ in range(n1)] + [fill_filter(rng, second) for _ in range(n2)]
    combos += [_distractor(rng, [first, second]) for _ in range(rng.randint(0, MAX_OBJECTS - n1 - n2))]
    text = f"What is the number of {_phrase(first)} plus the number of {_phrase(second)}?"
    return shapes_scene(rng, combos, width, height), {"op": "sum", "filters": [first, second]}, text, None


def _sample_position(rng, width, height):
    flt = _random_filter(rng, "both")
    axis = rng.choice(("horizontal", "vertical"))
    sides = ["left", "right"] if axis == "horizontal" else ["top", "bottom"]
    combos = [dict(flt)] + [_distractor(rng, [flt]) for _ in range(rng.randint(1, 5))]
    regions = [rng.choice(sides)] + [None] * (len(combos) - 1)
    where = "on the left or right side" if axis == "horizontal" else "in the top or bottom half"
    rng.shuffle(sides)
    scene = shapes_scene(rng, combos, width, height, regions=regions)
    text = f"Is the {_phrase(flt, 1)} {where} of the image?"
    return scene, {"op": "position", "filter": flt, "axis": axis}, text, sides


def _sample_shape(rng, width, height):
    flt = {"color": rng.choice(COLOR_ORDER), "shape": None}
    combos = [fill_filter(rng, flt)] + [_distractor(rng, [flt]) for _ in range(rng.randint(1, 5))]
    text = f"What shape is the only {flt['color']} object?"
    return shapes_scene(rng, combos, width, height), {"op": "shape_of", "filter": flt}, text, None


def _sample_chart(rng, width, height, tallest: bool):
    values = [rng.randint(1, CHART_MAX_VALUE - 1) for _ in range(rng.randint(2, 4))]
    while tallest and values.count(max(values)) > 1:
        values = [rng.randint(1, CHART_MAX_VALUE - 1) for _ in values]
    labels = list(LETTERS[: len(values)])
    scene = layout_chart(rng, values, width, height)
    intro = f"The bar chart shows bars {_join(labels)} from left to right"
    if tallest:
        return scene, {"op": "chart_tallest"}, f"{intro}. Which bar is the tallest?", [
            f"bar {label}" for label in labels]
    label = rng.choice(labels)
    text = f"{intro}, with one grid line per unit. What is the value of bar {label}?"
    return scene, {"op": "chart_value", "label": label}, text, None


def _sample_digit(rng, width, height):
    scene = layout_digit(rng, rng.randint(0, 9), width, height)
    return scene, {"op": "digit"}, "What digit is shown in the image?", None


_SAMPLERS = {
    "count": _sample_count, "color": _sample_color, "exist": _sample_exist,
    "arithmetic": _sample_arithmetic, "position": _sample_position, "shape": _sample_shape,
    "chart_tallest": lambda rng, w, h: _sample_chart(rng, w, h, tallest=True),
    "chart_value": lambda rng, w, h: _sample_chart(rng, w, h, tallest=False),
    "digit": _sample_digit,
    **GRID_SAMPLERS,
}


# Canonical option order used with ``fixed_options``: colours in COLOR_ORDER, then the sides.
_OPTION_ORDER = {text: i for i, text in enumerate(COLOR_ORDER + ("left", "right", "top", "bottom"))}


def sample_question(rng: random.Random, kind: str, width: int, height: int, *,
                    fixed_options: bool = False) -> dict:
    """One question record (without id/image) of ``kind`` on a fresh ``width x height`` scene.

    Returns ``{"question" ("<image>\\n" + text), "answer", "options"?, "source", "kind", "match_mode", "scene",
    "query"}``; the answer is derived from the scene by ``answer_from_scene``.

    ``fixed_options=True`` lists choice options in one canonical order (red, green, blue, yellow;
    left, right; top, bottom; bars A..D) instead of a shuffled one, so the option letter of an answer
    is a fixed function of it ("blue" is always C) rather than a look-up in the prompt. The rng draws
    are the same either way: the same seed gives the same scenes and questions, only the order differs.
    """
    if kind not in _SAMPLERS:
        raise ValueError(f"unknown question kind {kind!r}: choose one of {', '.join(ALL_KINDS)}")
    while True:  # a crowded random layout can fail to fit: draw a new scene
        scene, query, text, options = _SAMPLERS[kind](rng, width, height)
        if scene is not None:
            break
    if fixed_options and options:
        options = sorted(options, key=lambda o: _OPTION_ORDER.get(o, len(_OPTION_ORDER)))
    record = {"question": "<image>\n" + text, "answer": answer_from_scene(scene, query, options)}
    if options:
        record["options"] = options
    record.update(source=f"synthetic_{kind}", kind=kind, match_mode=MATCH_MODES[kind],
                  scene=scene, query=query)
    return record


# ---------------------------------------------------------------- answers from scenes

def _letter(options: list[str] | None, text: str) -> str | None:
    return LETTERS[options.index(text)] if options and text in options else None


def _bar_value(bar: dict) -> int:
    return bar["value"]


def _derive(scene: dict, query: dict, options: list[str] | None) -> str | None:
    """The answer the scene implies, or None when the query is ill-posed for it (e.g. no unique
    target): wrong chains of thought are built from perturbed scenes that may be ill-posed."""
    op = query["op"]
    if op == "digit":
        return str(scene["digit"])
    if op == "chart_value":
        return str(next(b["value"] for b in scene["bars"] if b["label"] == query["label"]))
    if op == "chart_tallest":
        bar = unique_max(scene["bars"], _bar_value)
        return bar and _letter(options, f"bar {bar['label']}")
    objects = scene["objects"]
    if op == "count":
        return str(count_matching(objects, query["filter"]))
    if op == "exist":
        return "Yes" if count_matching(objects, query["filter"]) else "No"
    if op == "total_minus":
        return str(len(objects) - count_matching(objects, query["filter"]))
    if op == "sum":
        return str(sum(count_matching(objects, flt) for flt in query["filters"]))
    if op == "color_of_largest":
        obj = unique_max(objects, object_area)
        return obj and _letter(options, obj["color"])
    hits = [o for o in objects if matches(o, query["filter"])]
    if len(hits) != 1:
        return None
    if op == "shape_of":
        return hits[0]["shape"]
    if op == "color_of":
        return _letter(options, hits[0]["color"])
    if op == "position":
        return _letter(options, side_of(hits[0], scene, query["axis"]))
    raise ValueError(f"unknown query op {op!r}")


def answer_from_scene(scene: dict, query: dict, options: list[str] | None = None) -> str:
    """Ground-truth answer string: option letter, integer as text, 'Yes'/'No' or a shape name."""
    answer = _derive(scene, query, options)
    if answer is None:
        raise ValueError(f"query {query} has no well-defined answer for this scene")
    return answer


# ---------------------------------------------------------------- chain-of-thought answers

def _describe(objects: list[dict]) -> str:
    groups: dict[tuple[str, str], int] = {}
    for obj in objects:
        groups[(obj["color"], obj["shape"])] = groups.get((obj["color"], obj["shape"]), 0) + 1
    keys = sorted(groups, key=lambda k: (COLOR_ORDER.index(k[0]), SHAPES.index(k[1])))
    return "I see " + _join([f"{groups[k]} {_phrase({'color': k[0], 'shape': k[1]}, groups[k])}"
                             for k in keys]) + "."


def _reasoning(scene: dict, query: dict, options: list[str] | None, answer: str, describe: bool = True) -> str:
    """Templated reasoning consistent with ``scene`` (the true or a misperceived one).

    ``describe=False`` leaves out the opening description of every object ("I see 2 red circles and ...")
    of shapes scenes, so the reasoning names only the objects the question is about.
    """
    op = query["op"]
    if scene.get("layout") == "grid":
        return grid_reasoning(scene, query, answer)
    if op == "digit":
        names = [SEGMENT_NAMES[s] for s in DIGIT_SEGMENTS[scene["digit"]]]
        return (f"I see one large {scene['color']} digit made of straight segments. The lit segments "
                f"are the {_join(names)}, which form the digit {answer}.")
    if scene["type"] == "chart":
        bars = _join([f"{b['label']} = {b['value']}" for b in scene["bars"]])
        text = f"The chart has {len(scene['bars'])} bars: {bars}."
        if op == "chart_tallest":
            bar = unique_max(scene["bars"], _bar_value)
            return text + (f" The tallest bar is {bar['label']} with a value of {bar['value']}, "
                           f"which is option {answer}.")
        return text + f" Bar {query['label']} reaches the grid line for {answer}."
    objects = scene["objects"]
    flt = query.get("filter")
    text = _describe(objects) + " " if describe else ""
    if op == "count":
        if answer == "0":
            return text + f"There are no {_phrase(flt)}, so the count is 0."
        return text + f"Counting the {_phrase(flt)} gives {answer}."
    if op == "exist":
        n = count_matching(objects, flt)
        if n == 0:
            return text + f"There is no {_phrase(flt, 1)}, so the answer is no."
        return text + f"There {'is' if n == 1 else 'are'} {n} {_phrase(flt, n)}, so the answer is yes."
    if op == "total_minus":
        total, part = len(objects), count_matching(objects, flt)
        return text + (f"There are {total} shapes in total and {part} {_phrase(flt, part)}, "
                       f"so {total} - {part} = {answer}.")
    if op == "sum":
        n1, n2 = (count_matching(objects, f) for f in query["filters"])
        f1, f2 = query["filters"]
        return text + (f"There are {n1} {_phrase(f1, n1)} and {n2} {_phrase(f2, n2)}, "
                       f"so {n1} + {n2} = {answer}.")
    if op == "color_of_largest":
        obj = unique_max(objects, object_area)
        return text + (f"The largest shape is the {obj['color']} {obj['shape']}, so its color is "
                       f"{obj['color']}. {obj['color'].capitalize()} is option {answer}.")
    (obj,) = [o for o in objects if matches(o, flt)]
    if op == "shape_of":
        return text + f"The only {flt['color']} object is a {obj['shape']}."
    if op == "color_of":
        return text + (f"The only {flt['shape']} is {obj['color']}. "
                       f"{obj['color'].capitalize()} is option {answer}.")
    side = side_of(obj, scene, query["axis"])
    return text + (f"The {_phrase(flt, 1)} is in the {side} half of the image. "
                   f"{side.capitalize()} is option {answer}.")


def cot_answer(question_record: dict, *, correct: bool = True, rng: random.Random,
               scene_description: bool = True) -> str:
    """Short templated chain of thought ending with a line ``Final answer: X``.

    Args:
        question_record: a record written by ``generate_task`` (needs ``scene``, ``query``,
            ``answer`` and, for choice questions, ``options``).
        correct: True: reasoning about the true scene, X is the ground truth (letter, number,
            Yes/No or shape name). False: the same reasoning about a misperceived scene (a missed,
            extra, recoloured, reshaped, mirrored or resized object; a misread bar or digit), so the
            chain is internally consistent and X differs from the truth.
        rng: drives the choice of mistakes; pass a seeded ``random.Random`` for reproducibility.
        scene_description: False: shapes-scene reasoning starts at the queried objects ("The only
            triangle is green. ...") instead of first describing every object in the image.
    """
    missing = [k for k in ("scene", "query", "answer") if k not in question_record]
    if missing:
        raise ValueError(f"question record lacks {missing}: use records written by generate_task")
    scene, query = question_record["scene"], question_record["query"]
    options, truth = question_record.get("options"), question_record["answer"]
    if _derive(scene, query, options) != truth:
        raise ValueError(f"record {question_record.get('id')!r}: answer {truth!r} does not match its scene")
    seen = scene
    if not correct:
        filters = query.get("filters") or ([query["filter"]] if "filter" in query else [])
        for _ in range(1000):
            seen = misperceive(rng, scene, filters)
            if _derive(seen, query, options) not in (None, truth):
                break
        else:
            raise AssertionError(f"no plausible wrong reading found for query {query}")
    answer = _derive(seen, query, options)
    return _reasoning(seen, query, options, answer, scene_description) + f"\nFinal answer: {answer}"


# ---------------------------------------------------------------- prompts

def bare_question(record: dict) -> str:
    """The question text of a record without its leading ``<image>\\n`` placeholder."""
    return record["question"].removeprefix("<image>\n")


def cot_prompt(record: dict) -> str:
    """MMPR question for a question record: ``<image>\\n`` + CoT instruction + question + options."""
    return "<image>\n" + COT_PROMPT.format(question=bare_question(record) + options_block(record))
