"""`python -m mpo.data.validate`: counts by reason, rejects file, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import write_image, write_mmpr


def run(*args):
    return subprocess.run([sys.executable, "-m", "mpo.data.validate", *map(str, args)], capture_output=True, text=True)


def test_counts_and_rejects(tmp_path, tiny_model_dir):
    root = tmp_path / "d"
    write_image(root / "ok.png")
    records = [
        {"image": "ok.png", "question": "q1", "chosen": "a", "rejected": "b"},
        {"image": "gone.png", "question": "q2", "chosen": "a", "rejected": "b"},
        {"question": "q3", "chosen": "a", "rejected": "a"},
        {"question": "q4 text", "chosen": "long answer " * 50, "rejected": "b"},
    ]
    write_mmpr(root, records, raw_lines=[b"{oops"])
    rejects = tmp_path / "rej.jsonl"
    proc = run(root, "--rejects", rejects)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["read"] == 5 and summary["accepted"] == 2 and summary["rejected"] == 3
    assert summary["by_reason"] == {"identical_responses": 1, "malformed_json": 1, "missing_image": 1}
    assert "token lengths not checked" in proc.stdout
    assert len(rejects.read_text().splitlines()) == 3

    # with the model: the image prompt (256 tokens per tile + system prompt) does not fit 200 tokens
    proc = run(root, "--model", tiny_model_dir, "--max-length", 200, "--rejects", rejects)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["by_reason"]["prompt_too_long"] >= 1
    assert summary["read"] == summary["accepted"] + summary["rejected"] == 5


def test_fatal_and_strict(tmp_path):
    proc = run(tmp_path / "nothing")
    assert proc.returncode == 2 and "meta.json" in proc.stderr and "Traceback" not in proc.stderr
    root = write_mmpr(tmp_path / "d", [{"question": "q", "chosen": "a"}])
    proc = run(root, "--strict", "--rejects", tmp_path / "r.jsonl")
    assert proc.returncode == 2 and "src.jsonl:1: missing_field" in proc.stderr
