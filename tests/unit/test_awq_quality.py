"""Held-out perplexity of chosen responses: unquantized vs RTN vs AWQ."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_image
from test_awq_checkpoint import grid_checkpoint, pack_decoder

from mpo.data.images import load_image_tiles
from mpo.data.template import ChatTemplate
from mpo.model.load import load_model, load_processor
from mpo.quant.calibrate import CalibrationSample
from mpo.quant.export import write_awq_checkpoint
from mpo.quant.quality import compare_perplexity, perplexity, response_nll, rtn_quantize_
from mpo.quant.quantizer import pseudo_quantize


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq_quality")
    source = grid_checkpoint(root / "src")
    model = load_model(source, dtype="float32").eval()
    write_awq_checkpoint(model, pack_decoder(model), source, root / "awq", group_size=128)
    template = ChatTemplate(load_processor(source).tokenizer, tokens_per_tile=64, system_prompt=None)
    tiles = load_image_tiles(write_image(root / "a.png", size=(90, 40)), max_num=2, tile_size=224).pixel_values
    samples = [
        CalibrationSample(template.prompt_ids("<image>\nWhat is it?", [tiles.shape[0]]),
                          template.response_ids("A red box."), tiles),
        CalibrationSample(template.prompt_ids("Name a colour.", []), template.response_ids("Blue, like the sea.")),
    ]
    return source, root / "awq", model, samples


def test_perplexity_matches_full_logits(setup):
    _, _, model, samples = setup
    nll, count = 0.0, 0
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        kwargs = {} if s.pixel_values is None else {"pixel_values": s.pixel_values}
        with torch.no_grad():
            logprobs = model(input_ids=ids, **kwargs).logits[0].double().log_softmax(-1)
        start = len(s.prompt_ids)
        for t, token in enumerate(s.response_ids):
            nll -= float(logprobs[start + t - 1, token])  # position p predicts token p + 1
        count += len(s.response_ids)
    got_nll, got_count = response_nll(model, samples, "cpu")
    assert got_count == count == sum(len(s.response_ids) for s in samples)
    assert got_nll == pytest.approx(nll, rel=1e-5)
    assert perplexity(model, samples, "cpu") == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_rtn_quantize_touches_only_decoder_linears(setup):
    source, _, _, _ = setup
    model = load_model(source, dtype="float32")
    # Move the decoder off the grid so RTN has something to do.
    with torch.no_grad():
        for p in model.model.language_model.layers.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
    vision_before = model.model.vision_tower.encoder.layer[0].mlp.fc1.weight.clone()
    norm_before = model.model.language_model.layers[0].input_layernorm.weight.clone()
    assert rtn_quantize_(model, group_size=128) == 14
    down = model.model.language_model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(down, pseudo_quantize(down, 128), atol=0, rtol=0)  # on the grid now
    assert torch.equal(model.model.vision_tower.encoder.layer[0].mlp.fc1.weight, vision_before)
    assert torch.equal(model.model.language_model.layers[0].input_layernorm.weight, norm_before)


def test_compare_perplexity_lossless_model(setup):
    source, awq, model, samples = setup
    result = compare_perplexity(source, awq, samples, device="cpu", dtype="float32")
    ppl = result["perplexity"]
    # Grid weights: RTN and AWQ are lossless, so all three agree with the direct computation.
    expected = perplexity(model, samples, "cpu")
    assert ppl["unquantized"] == pytest.approx(expected, rel=1e-6)
    assert ppl["rtn"] == pytest.approx(expected, rel=1e-6)
    assert ppl["awq"] == pytest.approx(expected, rel=1e-4)
    assert result["num_samples"] == 2 and result["dtype"] == "float32"
    assert result["num_tokens"] == sum(len(s.response_ids) for s in samples)


def test_quality_bad_inputs(setup):
    _, _, model, samples = setup
    with pytest.raises(ValueError, match="held-out"):
        response_nll(model, [], "cpu")
    with pytest.raises(ValueError, match="empty response"):
        response_nll(model, [CalibrationSample(samples[1].prompt_ids, [])], "cpu")
