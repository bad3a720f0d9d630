"""`python -m mpo.export_awq` / `mpo export-awq` end to end on a tiny checkpoint (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
FAST = ["dtype=float32", "calibration.num_samples=3", "calibration.max_response_tokens=16",
        "calibration.block_size=64", "calibration.system_prompt=", "progress=false"]


@pytest.fixture(scope="module")
def env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mpo.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("awq_cli")
    model = write_tiny_checkpoint(root / "model", seed=0, image_size=224)
    # An MMPR directory (tests/conftest.py's writer is not importable from here: integration has
    # its own conftest): meta.json + one jsonl + images.
    data = root / "data"
    data.mkdir()
    lines = []
    for i in range(6):
        Image.new("RGB", (50 + 10 * i, 40), (40 * i, 100, 50)).save(data / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "question": f"Which shape is number {i}?",
                                 "chosen": f"It is the square number {i}.", "rejected": "A circle."}))
    (data / "src.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"src": {"root": ".", "annotation": "src.jsonl", "repeat_time": 1, "length": len(lines)}}
    (data / "meta.json").write_text(json.dumps(meta))
    return model, data


def run(env, *args: str, module: str = "mpo.export_awq") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)


def test_cli_exports_with_images_and_quality(env, inputs, tmp_path):
    model, data = inputs
    out = tmp_path / "awq"
    proc = run(env, f"model={model}", f"data={data}", f"output_dir={out}", *FAST,
               "quality.enabled=true", "quality.num_samples=2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"wrote {out}: 2 layers" in proc.stdout and "held-out perplexity" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    assert {"model.safetensors", "tokenizer.json", "processor_config.json", "awq_report.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / ".hydra").exists()  # the checkpoint directory holds only the checkpoint
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        names = set(fh.keys())
    assert "language_model.model.layers.1.mlp.gate_proj.qweight" in names
    assert "language_model.model.layers.1.mlp.gate_proj.weight" not in names
    assert "vision_tower.encoder.layer.0.mlp.fc1.weight" in names
    report = json.loads((out / "awq_report.json").read_text())
    assert report["calibration"]["source"] == "mmpr" and report["calibration"]["num_image_tokens"] > 0
    assert report["quality"]["num_samples"] == 2
    assert set(report["quality"]["perplexity"]) == {"unquantized", "rtn", "awq"}


def test_cli_text_only_through_mpo_command(env, inputs, tmp_path):
    model, _ = inputs
    out = tmp_path / "awq_text"
    proc = run(env, "export-awq", f"model={model}", f"output_dir={out}", *FAST,
               "calibration.samples_per_prompt=3", module="mpo.cli")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "awq_report.json").read_text())
    assert report["calibration"]["source"] == "generated"
    assert report["calibration"]["num_samples"] == 3 and report["calibration"]["num_image_tokens"] == 0


def test_cli_refuses_typos_and_bad_values(inputs, tmp_path, capsys):
    # In process: the same `main` the command runs, without paying the interpreter start-up per case.
    from mpo.export_awq import main

    model, _ = inputs
    cases = {
        "num_sample": [f"model={model}", f"output_dir={tmp_path / 'a'}", "calibration.num_sample=3"],
        "max_shrink": [f"model={model}", f"output_dir={tmp_path / 'b'}", "quant.max_shrink=1.5"],
        "model": [f"output_dir={tmp_path / 'c'}"],
        "fp16 overflows": [f"model={model}", f"output_dir={tmp_path / 'd'}", "dtype=float16"],
    }
    for needle, overrides in cases.items():
        assert main(overrides) == 2
        err = capsys.readouterr().err
        assert err.startswith("mpo.export_awq: error:") and needle in err, err
    assert not any((tmp_path / name).exists() for name in "abcd")
    assert main(["--help"]) == 0 and "output_dir" in capsys.readouterr().out
