"""`python -m mpo.infer` contract: greedy text equals `transformers` greedy generate; samples; errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import write_image

from mpo.infer.__main__ import main
from mpo.infer.engine import Engine, Request, SamplingParams


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("cli") / "img.png", size=(60, 40), color=(10, 200, 40))


def test_cli_greedy_text_equals_transformers_generate(tiny_model_dir, image):
    question = "What colour is the square?"
    reference = Engine.load(tiny_model_dir, device="cpu", backend="hf").generate(
        [Request(question, images=[str(image)], max_dynamic_patch=1)], SamplingParams(max_new_tokens=12))[0][0]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "mpo.infer", str(tiny_model_dir), "--prompt", question, "--image", str(image),
         "--max-new-tokens", "12", "--max-dynamic-patch", "1", "--device", "cpu"],
        capture_output=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert proc.stdout == (reference.text + "\n").encode("utf-8")


def test_cli_samples_as_json_are_seeded(tiny_model_dir, capsys):
    argv = [str(tiny_model_dir), "--prompt", "Tell me a story.", "--max-new-tokens", "6", "--temperature", "1.0",
            "--num-samples", "3", "--seed", "4", "--device", "cpu", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert len(first) == 3 and all(len(s["token_ids"]) == len(s["logprobs"]) <= 6 for s in first)
    assert len({tuple(s["token_ids"]) for s in first}) == 3


def test_cli_prints_one_block_per_sample(tiny_model_dir, capsys):
    assert main([str(tiny_model_dir), "--prompt", "Hi", "--max-new-tokens", "3", "--num-samples", "2",
                 "--device", "cpu", "--backend", "hf"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### sample 1\n") and "\n### sample 2\n" in out


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "temperature"),
    (["--num-samples", "0"], "num_samples"),
    (["--image", "/nonexistent/picture.png"], "picture.png"),
])
def test_cli_errors_name_the_problem(tiny_model_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main([str(tiny_model_dir), "--prompt", "Hi", "--device", "cpu", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope"), "--prompt", "Hi"])
    assert "config.json not found" in capsys.readouterr().err
