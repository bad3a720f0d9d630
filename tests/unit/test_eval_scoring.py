"""Answer extraction, per-benchmark scorers and report writing (mpo.eval.extract / scorers / report)."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from mpo.eval.benchmarks import Item, load_benchmark
from mpo.eval.extract import (
    anls,
    answer_span,
    extract_number,
    extract_option,
    extract_yes_no,
    normalize_answer,
    numbers_match,
)
from mpo.eval.report import render_markdown, write_results
from mpo.eval.scorers import custom_item_values, score


def _png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (10, 20, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _write_tsv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------- extraction

OPTIONS = {"A": "dog", "B": "cat", "C": "black cat", "D": "8/11"}

OPTION_CASES = [
    ("B", False, "B"),
    ("(b)", False, "B"),
    ("B.", False, "B"),
    (" C: ", False, "C"),
    ("[D]", False, "D"),
    ("**B**", False, "B"),
    ("d", False, "D"),
    ("The answer is B.", False, "B"),
    ("Answer: (C)", False, "C"),
    ("the correct option is D", False, "D"),
    ("Therefore the answer is (A) dog", False, "A"),
    ("The correct choice is [C].", False, "C"),
    ("Option B is the only one that fits the picture.", False, "B"),
    ("The answer is A, not B", False, "A"),
    ("C. black cat", False, "C"),
    ("B) cat", False, "B"),
    ("I would choose D", False, "D"),
    ("It should be B!", False, "B"),
    ("cat", False, "B"),                       # exact option text
    ("black cat", False, "C"),                 # "cat" is inside "black cat": the longer one wins
    ("The animal is a dog", False, "A"),       # unique option text
    ("The answer is 8/11", False, "D"),        # option text with punctuation
    ("A cat", False, "B"),                     # "A" is an article here; the option text decides
    ("A is correct", False, "A"),
    ("A and B", False, None),                  # two letters: ambiguous
    ("Either C or D", False, None),
    ("I cannot determine this.", False, None),
    ("", False, None),
    ("answer is Apple", False, None),          # a capital word is not a letter
    ("E", False, None),                        # not an option
    ("A dog sits quietly on the mat near the old window", False, None),  # letter too early
    ("Let me compare C and D.\nFinal answer: B", True, "B"),
    ("Final answer: (A)\nWait.\nFinal answer: (D)", True, "D"),
    ("final ANSWER: cat", True, "B"),
    ("No trigger here, so just C", True, "C"),  # cot without the trigger reads the whole text
    ("Reasoning mentions B twice, B.\nFinal answer: black cat", True, "C"),
]


@pytest.mark.parametrize("prediction, cot, expected", OPTION_CASES)
def test_extract_option_table(prediction, cot, expected):
    assert extract_option(prediction, OPTIONS, cot=cot) == expected


def test_option_table_is_large_enough():
    assert len(OPTION_CASES) >= 30


def test_extract_option_bad_inputs():
    with pytest.raises(ValueError, match="options is empty"):
        extract_option("A", {})
    with pytest.raises(ValueError, match="single upper-case letters"):
        extract_option("A", {"a": "x", "BB": "y"})
    with pytest.raises(ValueError, match="must be a str"):
        extract_option(None, OPTIONS)  # type: ignore[arg-type]


@pytest.mark.parametrize("prediction, cot, expected", [
    ("Yes.", False, "yes"),
    ("no,", False, "no"),
    ("I think yes", False, "yes"),
    ("NO", False, "no"),
    ("Yes, there is no dog.", False, "yes"),   # a leading answer decides
    ("The answer is no.", False, "no"),
    ("yes or no", False, None),
    ("Not sure", False, None),                 # "not" is not "no"
    ("yesterday", False, None),
    ("", False, None),
    ("There is no dog, so yes", False, None),  # both words, neither leads
    ("Maybe yes.\nFinal answer: No", True, "no"),
])
def test_extract_yes_no(prediction, cot, expected):
    assert extract_yes_no(prediction, cot=cot) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("42", 42.0),
    ("The answer is 1,234 apples", 1234.0),
    ("3/4", 0.75),
    ("\u22125", -5.0),
    ("about 5%", 5.0),
    ("x is 2.5 and y is -0.5", -0.5),
    (r"\boxed{\frac{1}{2}} and not 7", 0.5),
    ("range 2007-2008", 2008.0),             # a hyphen between numbers is not a minus sign
    ("3.5e2", 350.0),
    ("three", 3.0),
    ("no digits at all", None),
    ("", None),
])
def test_extract_number(prediction, expected):
    assert extract_number(prediction) == expected


def test_answer_span_and_matching_primitives():
    assert answer_span("a Final answer: x final answer: y", cot=True) == " y"
    assert answer_span("Final answer: y") == "Final answer: y"
    assert numbers_match(0.1 + 0.2, 0.3) and not numbers_match(1.01, 1.0) and not numbers_match(None, 1.0)
    assert numbers_match(1000.9, 1000.0)  # within 1e-3 relative
    assert normalize_answer("The 3.5 Apples.") == "3.5 apples"
    # ANLS: 1 - edit/max_len, zero below 0.5; best gold wins.
    assert anls("hello word", ["hello world"]) == pytest.approx(1 - 1 / 11)
    assert anls("abc", ["xyz"]) == 0.0
    assert anls("ABC", ["zzz", "abc"]) == 1.0
    with pytest.raises(ValueError):
        anls("x", [])


# ----------------------------------------------------------------------------------- MMBench


def _mmbench_rows() -> list[dict]:
    image = _png_base64()
    rows = []
    # (index, answer, category): group 0 and 1 have rotations, group 2 has none.
    for index, answer, category in [
        (0, "A", "color"), (1000000, "B", "color"), (2000000, "C", "color"),
        (1, "B", "color"), (1000001, "C", "color"),
        (2, "A", "shape"),
    ]:
        rows.append({"index": index, "question": "q", "A": "x", "B": "y", "C": "z", "answer": answer,
                     "category": category, "l2-category": "perception",
                     "image": image if index < 1000000 else str(index % 1000000)})
    return rows


def test_mmbench_circular_groups(tmp_path):
    _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", _mmbench_rows())
    items = load_benchmark("mmbench", tmp_path)
    predictions = {
        0: "A", 1000000: "The answer is B", 2000000: "(C)",  # group 0: every rotation right
        1: "B", 1000001: "A",                               # group 1: one rotation wrong
        2: "A. x",                                           # group 2: single row, right
    }
    result = score("mmbench", items, predictions)
    assert result["num_groups"] == 3 and result["num_items"] == 6 and result["missing"] == 0
    assert result["overall"] == pytest.approx(200 / 3)
    assert result["categories"] == pytest.approx({"color": 50.0, "shape": 100.0})
    assert result["vanilla"] == pytest.approx(100.0)  # all original rows are right
    assert result["l2_categories"] == pytest.approx({"perception": 200 / 3})

    # Independent formula: a group is right iff all(pred == gold) over its rows.
    groups = defaultdict(list)
    for item in items:
        groups[item.index % 1_000_000].append(extract_option(predictions[item.index], item.options) == item.answer)
    assert result["overall"] == pytest.approx(100 * sum(all(g) for g in groups.values()) / len(groups))


def test_mmbench_missing_prediction_fails_its_group(tmp_path):
    _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", _mmbench_rows())
    items = load_benchmark("mmbench", tmp_path)
    predictions = {"0": "A", "1000000": "B", "2000000": "C", "1": "B", "1000001": "C"}  # str keys match too
    result = score("mmbench", items, predictions)
    assert result["missing"] == 1
    assert result["overall"] == pytest.approx(200 / 3)
    assert result["categories"] == pytest.approx({"color": 100.0, "shape": 0.0})


def test_mmbench_rejects_non_integer_index():
    items = [Item(index="a1", question="q", answer="A", options={"A": "x", "B": "y"})]
    with pytest.raises(ValueError, match="not an integer"):
        score("mmbench", items, {"a1": "A"})


# ----------------------------------------------------------------------------------- MCQ (MMStar)


def test_plain_mcq_scores_rows_and_checks_gold():
    items = [
        Item(index=1, question="q", answer="A", options={"A": "x", "B": "y"}, category="c1"),
        Item(index=2, question="q", answer="y", options={"A": "x", "B": "y"}, category="c2"),  # gold by text
        Item(index=3, question="q", answer="B", options={"A": "x", "B": "y"}, category="c2"),
    ]
    result = score("mmstar", items, {1: "A", 2: "B", 3: "I am not sure"})
    assert result["overall"] == pytest.approx(200 / 3)
    assert result["categories"] == pytest.approx({"c1": 100.0, "c2": 50.0})
    bad = [Item(index=1, question="q", answer="Z", options={"A": "x", "B": "y"})]
    with pytest.raises(ValueError, match="neither an option letter"):
        score("ai2d", bad, {1: "A"})


# ----------------------------------------------------------------------------------- OCRBench


def test_ocrbench_list_answers_and_hme(tmp_path):
    _write_tsv(tmp_path / "OCRBench.tsv", [
        {"index": 1, "question": "Read.", "answer": "['Hello', 'HELLO WORLD']", "category": "Regular Text Recognition"},
        {"index": 2, "question": "Number?", "answer": "['42']", "category": "Scene Text-centric VQA"},
        {"index": 3, "question": "Formula?", "answer": "['x^{2} + 1']",
         "category": "Handwritten Mathematical Expression Recognition"},
        {"index": 4, "question": "Formula?", "answer": "['x^{2} + 1']",
         "category": "Handwritten Mathematical Expression Recognition"},
        {"index": 5, "question": "What?", "answer": "plain answer", "category": "Doc-oriented VQA"},  # not a list
        {"index": 6, "question": "Missing", "answer": "['z']", "category": "Doc-oriented VQA"},
    ])
    items = load_benchmark("ocrbench", tmp_path)
    predictions = {
        1: "The text says\nhello world",  # lower-cased substring
        2: "It is 24",
        3: "x^{2}+1",                      # spaces stripped for HME
        4: "X^{2}+1",                      # HME keeps case (LaTeX)
        5: "a PLAIN ANSWER.",
    }
    result = score("ocrbench", items, predictions)
    assert result["missing"] == 1
    assert result["score_1000"] == pytest.approx(1000 * 3 / 6)
    assert result["overall"] == pytest.approx(50.0)
    assert result["category_counts"] == {
        "Doc-oriented VQA": 1, "Handwritten Mathematical Expression Recognition": 1,
        "Regular Text Recognition": 1, "Scene Text-centric VQA": 0}
    assert result["categories"]["Handwritten Mathematical Expression Recognition"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------------- HallusionBench

# (category, set, figure, question, answer, prediction, right?)
HALLUSION_ROWS = [
    ("VD", 0, 0, 0, "Yes", "Yes.", True),
    ("VD", 0, 1, 0, "No", "no,", True),
    ("VD", 0, 0, 1, "Yes", "I think yes", True),
    ("VD", 0, 1, 1, "No", "Yes", False),
    ("VS", 1, 0, 0, "Yes", "yes or no", False),
    ("VS", 1, 1, 0, "No", "No.", True),
]


def _hallusion_items(with_id_columns: bool) -> list[Item]:
    items = []
    for position, (category, set_id, figure_id, question_id, answer, _, _) in enumerate(HALLUSION_ROWS):
        ids = {"set_id": str(set_id), "figure_id": str(figure_id), "question_id": str(question_id)}
        index = position if with_id_columns else f"{category}_chart_x_{set_id}_{figure_id}_{question_id}"
        items.append(Item(index=index, question="q", answer=answer, category=category, l2_category="chart",
                          extra=ids if with_id_columns else {}))
    return items


@pytest.mark.parametrize("with_id_columns", [True, False])
def test_hallusionbench_aacc_facc_qacc(with_id_columns):
    items = _hallusion_items(with_id_columns)
    predictions = {item.index: row[5] for item, row in zip(items, HALLUSION_ROWS)}
    result = score("hallusionbench", items, predictions)
    # aAcc: 4 of 6 rows. fAcc: figures (VD,0,0) ok, (VD,0,1) fails, (VS,1,0) fails, (VS,1,1) ok → 2/4.
    # qAcc: questions (VD,0,0) ok, (VD,0,1) fails, (VS,1,0) fails → 1/3.
    assert result["aAcc"] == pytest.approx(400 / 6)
    assert result["fAcc"] == pytest.approx(50.0)
    assert result["qAcc"] == pytest.approx(100 / 3)
    assert result["overall"] == pytest.approx((400 / 6 + 50 + 100 / 3) / 3)
    assert result["category_metrics"]["VD"] == pytest.approx({"aAcc": 75.0, "fAcc": 50.0, "qAcc": 50.0,
                                                              "overall": 175 / 3})
    assert result["categories"] == pytest.approx({"VD": 175 / 3, "VS": 100 / 3})
    assert result["aAcc"] == pytest.approx(100 * sum(row[6] for row in HALLUSION_ROWS) / len(HALLUSION_ROWS))


def test_hallusionbench_without_ids_reports_aacc_only():
    items = [Item(index=i, question="q", answer=a) for i, a in enumerate(["Yes", "No"])]
    result = score("hallusionbench", items, {0: "yes", 1: "yes"})
    assert result["fAcc"] is None and result["qAcc"] is None
    assert result["overall"] == pytest.approx(50.0) == result["aAcc"]
    with pytest.raises(ValueError, match="not yes/no"):
        score("hallusionbench", [Item(index=0, question="q", answer="maybe")], {0: "yes"})


# ----------------------------------------------------------------------------------- MathVista


def test_mathvista_mixed(tmp_path):
    _write_tsv(tmp_path / "MathVista_MINI.tsv", [
        {"index": 1, "question": "Which?", "answer": "4", "choices": "['3', '4']", "answer_option": "B",
         "question_type": "multi_choice", "answer_type": "text", "precision": "", "task": "FQA"},
        {"index": 2, "question": "How many?", "answer": "5", "choices": "", "answer_option": "",
         "question_type": "free_form", "answer_type": "integer", "precision": "", "task": "MWP"},
        {"index": 3, "question": "Length?", "answer": "2.5", "choices": "", "answer_option": "",
         "question_type": "free_form", "answer_type": "float", "precision": "1.0", "task": "MWP"},
        {"index": 4, "question": "Ratio?", "answer": "1.25", "choices": "", "answer_option": "",
         "question_type": "free_form", "answer_type": "float", "precision": "2", "task": "MWP"},
        {"index": 5, "question": "Years?", "answer": "[2007, 2008]", "choices": "", "answer_option": "",
         "question_type": "free_form", "answer_type": "list", "precision": "", "task": "FQA"},
        {"index": 6, "question": "Color?", "answer": "blue", "choices": "", "answer_option": "",
         "question_type": "free_form", "answer_type": "text", "precision": "", "task": "VQA"},
        {"index": 7, "question": "Which?", "answer": "3", "choices": "['3', '4']", "answer_option": "",
         "question_type": "multi_choice", "answer_type": "text", "precision": "", "task": "FQA"},
    ])
    items = load_benchmark("mathvista", tmp_path)
    predictions = {1: "The answer is (B).", 2: "There are 5 apples.", 3: "about 2.54", 4: "1.2",
                   5: "2007 and 2008", 6: "blue", 7: "B"}
    result = score("mathvista", items, predictions)
    assert result["needs_judge"] == 2 and result["needs_judge_indices"] == [5, 6]
    assert result["num_scored"] == 5
    assert result["overall"] == pytest.approx(60.0)  # items 1, 2, 3 right; 4 and 7 wrong
    assert result["categories"] == pytest.approx({"FQA": 50.0, "MWP": 200 / 3})


def test_mathvista_cot_parses_after_final_answer():
    item = Item(index=1, question="How many?", answer="7", extra={"question_type": "free_form",
                                                                   "answer_type": "integer"})
    assert score("mathvista", [item], {1: "3 + 4 = 7, minus 2 is 5. Final answer: 7"}, cot=True)["overall"] == 100.0
    assert score("mathvista", [item], {1: "3 + 4 = 7. Final answer: 7 (not 5)"}, cot=False)["overall"] == 0.0


# ----------------------------------------------------------------------------------- MMMU


def test_mmmu_open_and_validation_split(tmp_path):
    _write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", [
        {"index": 1, "question": "q", "A": "x", "B": "y", "answer": "B", "category": "Math", "split": "validation"},
        {"index": 2, "question": "Length?", "A": "", "B": "", "answer": "12.5", "category": "Math", "split": "validation"},
        {"index": 3, "question": "Share?", "A": "", "B": "", "answer": "['3/4', '0.75']", "category": "Math",
         "split": "validation"},
        {"index": 4, "question": "Capital?", "A": "", "B": "", "answer": "Paris", "category": "Geo", "split": "validation"},
        {"index": 5, "question": "Capital?", "A": "", "B": "", "answer": "Paris", "category": "Geo", "split": "validation"},
        {"index": 6, "question": "q", "A": "x", "B": "y", "answer": "A", "category": "Geo", "split": "dev"},
    ])
    items = load_benchmark("mmmu", tmp_path)
    predictions = {1: "B", 2: "The length is 12.50 cm", 3: "0.75", 4: "paris.", 5: "London", 6: "B"}
    result = score("mmmu", items, predictions)
    assert result["overall_split"] == "validation"
    assert result["overall"] == pytest.approx(80.0)
    assert result["splits"] == pytest.approx({"dev": 0.0, "validation": 80.0})
    assert result["categories"] == pytest.approx({"Geo": 50.0, "Math": 100.0})
    assert result["num_open"] == 4 and result["num_scored"] == 5


# ----------------------------------------------------------------------------------- custom jsonl


def test_custom_scorers(tmp_path):
    records = [
        {"index": 1, "image": None, "question": "q", "options": ["x", "y"], "answer": "B", "scorer": "choice"},
        {"index": 2, "image": None, "question": "q", "options": None, "answer": "no", "scorer": "yesno"},
        {"index": 3, "image": None, "question": "q", "options": None, "answer": "1000", "scorer": "number"},
        {"index": 4, "image": None, "question": "q", "options": None, "answer": "New York", "scorer": "exact"},
        {"index": 5, "image": None, "question": "q", "options": None, "answer": "the cat", "scorer": "exact"},
        {"index": 6, "image": None, "question": "q", "options": None, "answer": "hello world", "scorer": "anls"},
        {"index": 7, "image": None, "question": "q", "options": None, "answer": ["the cat", "kitten"], "scorer": "vqa"},
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    name = f"custom:{path}"
    items = load_benchmark(name)
    predictions = {1: "B", 2: "No.", 3: "1,000 people", 4: "new  york", 5: "cat", 6: "hello word", 7: "Cat."}
    result = score(name, items, predictions)
    assert result["overall"] == pytest.approx(100 * (5 + (1 - 1 / 11)) / 7)
    assert result["scorers"] == pytest.approx({"anls": 100 * (1 - 1 / 11), "choice": 100.0, "exact": 50.0,
                                               "number": 100.0, "vqa": 100.0, "yesno": 100.0})
    assert score(name, items, {})["missing"] == 7


def test_custom_scorer_bad_gold():
    item = Item(index=1, question="q", answer="maybe", scorer="yesno")
    with pytest.raises(ValueError, match="yes or no"):
        score("custom:x.jsonl", [item], {1: "yes"})
    item = Item(index=1, question="q", answer="many", scorer="number")
    with pytest.raises(ValueError, match="numeric answer"):
        score("custom:x.jsonl", [item], {1: "3"})


# ----------------------------------------------------------------------------------- score() inputs


def test_score_bad_inputs():
    item = Item(index=1, question="q", answer="A", options={"A": "x", "B": "y"})
    with pytest.raises(ValueError, match="unknown benchmark"):
        score("mmbench_v2", [item], {1: "A"})
    with pytest.raises(ValueError, match="no items"):
        score("mmstar", [], {})
    with pytest.raises(ValueError, match="must be a dict"):
        score("mmstar", [item], ["A"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a str"):
        score("mmstar", [item], {1: 3})


# ----------------------------------------------------------------------------------- report


def _scores(overall: float, **extra) -> dict:
    return {"overall": overall, "categories": {"c": overall}, **extra}


def test_write_results_several_models(tmp_path):
    results = {
        "base": {"mmbench": _scores(70.0), "ocrbench": _scores(82.0, score_1000=820.0)},
        "mpo": {"mmbench": _scores(72.5), "ocrbench": _scores(88.0, score_1000=880.0),
                "mathvista": _scores(65.3, needs_judge=3, missing=2)},
    }
    paths = write_results(tmp_path / "out", results)
    assert json.loads(paths["json"].read_text()) == results  # several models: model → bench → scores
    markdown = paths["markdown"].read_text()
    assert "| benchmark | base | mpo |" in markdown
    assert "| mmbench | 70.0 | 72.5 (+2.5) |" in markdown
    assert "| ocrbench | 82.0 | 88.0 (+6.0) |" in markdown
    assert "| mathvista | — | 65.3 |" in markdown
    assert "3 items need a judge" in markdown and "2 items had no prediction" in markdown
    with Image.open(paths["plot"]) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_write_results_single_model_is_flat(tmp_path):
    results = {"only": {"mmstar": _scores(60.2), "hallusionbench": _scores(47.8, fAcc=None)}}
    paths = write_results(tmp_path, results)
    assert json.loads(paths["json"].read_text()) == results["only"]
    assert "| mmstar | 60.2 |" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 0


@pytest.mark.parametrize("results, message", [
    ({}, "results is empty"),
    ({"m": {}}, "non-empty dict"),
    ({"m": {"mmbench": {"categories": {}}}}, "has no 'overall'"),
    ({"m": {"mmbench": {"overall": float("nan")}}}, "finite number"),
])
def test_report_bad_inputs(tmp_path, results, message):
    with pytest.raises(ValueError, match=message):
        write_results(tmp_path, results)
    with pytest.raises(ValueError, match=message):
        render_markdown(results)


def test_answer_span_positions_survive_case_folding():
    from mpo.eval.extract import answer_span

    # "İ".lower() is two code points: a lowercase copy would shift every later position
    assert answer_span("İİ Final answer: B", cot=True) == " B"
    assert answer_span("FINAL ANSWER: c ... final answer: D", cot=True) == " D"


def test_custom_item_values_are_what_score_averages(tmp_path):
    rows = [{"index": 0, "question": "How many?", "answer": "3", "scorer": "number", "category": "count"},
            {"index": 1, "question": "Any red?", "answer": "yes", "scorer": "yesno", "category": "exist"},
            {"index": "c", "question": "Which?", "options": ["cat", "dog"], "answer": "B", "scorer": "choice"}]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    items = load_benchmark(f"custom:{path}")
    predictions = {0: "Three squares... Final answer: 3", "1": "Final answer: no"}  # "c" has no prediction
    values = custom_item_values(items, predictions, cot=True)
    assert values == {"0": 1.0, "1": 0.0, "c": 0.0}
    assert score(f"custom:{path}", items, predictions, cot=True)["overall"] == pytest.approx(100 / 3)
