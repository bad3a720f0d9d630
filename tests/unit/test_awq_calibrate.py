"""AWQ calibration data: MMPR / generated conversations, VLM embeddings, packing, layer-0 capture."""

from __future__ import annotations

import pytest
import torch
from conftest import write_image, write_mmpr

from mpo.data.template import ChatTemplate
from mpo.model.load import load_model, load_processor
from mpo.model.tiny import write_tiny_checkpoint
from mpo.quant.calibrate import (
    CalibrationSample,
    calibration_inputs,
    capture_layer_inputs,
    generated_samples,
    mmpr_samples,
    pack_rows,
    sample_embeddings,
)

TOKENS_PER_TILE = 64  # 224 px tiles


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("calib") / "model", seed=1, image_size=224)
    model = load_model(path, dtype="float32").eval()
    processor = load_processor(path)
    template = ChatTemplate(processor.tokenizer, tokens_per_tile=TOKENS_PER_TILE, system_prompt=None)
    return model, processor, template


@pytest.fixture(scope="module")
def mmpr_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_mmpr")
    records = []
    for i in range(6):
        write_image(root / f"img{i}.png", size=(40 + 10 * i, 30), color=(40 * i, 90, 160))
        records.append({"image": f"img{i}.png", "question": f"<image>\nWhat is drawn in picture {i}?",
                        "chosen": f"A shape number {i}. " * 10, "rejected": "no"})
    records.append({"image": "absent.png", "question": "Where?", "chosen": "Here.", "rejected": "no"})
    records.append({"question": "Text only: two plus two?", "chosen": "Four.", "rejected": "Five."})
    return write_mmpr(root, records)


# ---------------------------------------------------------------- packing


def test_pack_rows_hand_worked():
    a = torch.arange(6.0).reshape(3, 2)  # tokens 0..2
    b = torch.arange(6.0, 14.0).reshape(4, 2)  # tokens 3..6
    rows = pack_rows([a, b], block_size=3)
    # Stream of 7 tokens, rows of 3: tokens 0-2 and 3-5; token 6 does not fill a row.
    assert rows.shape == (2, 3, 2)
    assert rows[0].tolist() == a.tolist() and rows[1].tolist() == b[:3].tolist()
    assert pack_rows([a, b], block_size=100).shape == (1, 7, 2)  # one row of everything
    capped = pack_rows([a, b], block_size=2, max_total_tokens=5)
    assert capped.shape == (2, 2, 2) and capped.reshape(4, 2).tolist() == torch.cat([a, b])[:4].tolist()


def test_pack_rows_bad_inputs():
    with pytest.raises(ValueError, match="no calibration"):
        pack_rows([], block_size=4)
    with pytest.raises(ValueError, match="must be >= 1"):
        pack_rows([torch.zeros(2, 2)], block_size=0)


# ---------------------------------------------------------------- samples


def test_mmpr_samples_split_truncation_and_rejects(mmpr_dir, tiny):
    _, _, template = tiny
    # 8 records, one with a missing image: asking for 8 reads them all and returns the 7 usable.
    cal = mmpr_samples(mmpr_dir, template, num_samples=4, num_held_out=4, max_response_tokens=5,
                       tile_size=224, seed=0)
    assert cal.source == "mmpr" and len(cal.samples) == 4 and len(cal.held_out) == 3
    assert cal.rejects == {"missing_image": 1}
    for sample in cal.samples + cal.held_out:
        assert 1 <= len(sample.response_ids) <= 5
        num_image_tokens = sample.prompt_ids.count(template.img_context_id)
        tiles = 0 if sample.pixel_values is None else sample.pixel_values.shape[0]
        assert num_image_tokens == TOKENS_PER_TILE * tiles
    # Same seed, same draw; the held-out part never repeats a calibration conversation.
    again = mmpr_samples(mmpr_dir, template, num_samples=4, num_held_out=4, max_response_tokens=5,
                         tile_size=224, seed=0)
    assert [s.prompt_ids for s in again.samples] == [s.prompt_ids for s in cal.samples]
    keys = [tuple(s.prompt_ids) for s in cal.samples + cal.held_out]
    assert len(set(keys)) == len(keys)


def test_mmpr_samples_text_only_and_short_dataset(mmpr_dir, tiny):
    _, _, template = tiny
    cal = mmpr_samples(mmpr_dir, template, num_samples=50, max_response_tokens=512, use_images=False,
                       tile_size=224, seed=3)
    # Text-only reads every record (no image to miss): 8 records, all used, none held out.
    assert cal.source == "mmpr_text" and len(cal.samples) == 8 and cal.held_out == []
    for sample in cal.samples:
        assert sample.pixel_values is None
        assert template.img_context_id not in sample.prompt_ids and template.img_start_id not in sample.prompt_ids
        assert sample.response_ids[-1] == template.im_end_id  # not truncated: <|im_end|> kept


def test_samples_bad_inputs(tmp_path, tiny):
    _, processor, template = tiny
    with pytest.raises(ValueError, match="num_samples=0"):
        mmpr_samples(tmp_path, template, num_samples=0)
    empty = write_mmpr(tmp_path / "empty", [{"image": "gone.png", "question": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="rejected"):
        mmpr_samples(empty, template, num_samples=2, tile_size=224)
    model = tiny[0]
    with pytest.raises(ValueError, match="samples_per_prompt"):
        generated_samples(model, processor, num_samples=1, samples_per_prompt=0)


def test_generated_samples_count_and_determinism(tiny):
    model, processor, template = tiny
    kwargs = dict(num_samples=3, num_held_out=1, max_new_tokens=4, samples_per_prompt=2, seed=5,
                  prompts=("Tell me a fact.", "Count to three."))
    cal = generated_samples(model, processor, **kwargs)
    assert cal.source == "generated" and len(cal.samples) == 3 and len(cal.held_out) == 1
    assert cal.samples[0].prompt_ids == template.prompt_ids("Tell me a fact.", [])
    assert cal.held_out[0].prompt_ids == template.prompt_ids("Count to three.", [])
    assert all(1 <= len(s.response_ids) <= 4 and s.pixel_values is None for s in cal.samples)
    again = generated_samples(model, processor, **kwargs)
    assert [s.response_ids for s in again.samples] == [s.response_ids for s in cal.samples]


# ---------------------------------------------------------------- embeddings and capture


def test_sample_embeddings_match_the_models_own_merge(mmpr_dir, tiny):
    model, _, template = tiny
    sample = mmpr_samples(mmpr_dir, template, num_samples=1, tile_size=224, seed=0).samples[0]
    assert sample.pixel_values is not None
    ours = sample_embeddings(model, sample, "cpu")
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        out = model.model(input_ids=ids, pixel_values=sample.pixel_values, output_hidden_states=True)
    # The LLM's first hidden state is its input embedding, image features merged by the model.
    torch.testing.assert_close(ours, out.hidden_states[0][0])
    bad = CalibrationSample(sample.prompt_ids[:-5] + sample.prompt_ids[-4:], sample.response_ids,
                            torch.cat([sample.pixel_values, sample.pixel_values]))
    with pytest.raises(ValueError, match="image tokens"):
        sample_embeddings(model, bad, "cpu")


def test_captured_kwargs_replay_the_whole_llm(tiny):
    model, _, _ = tiny
    hidden = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(model, hidden)
    assert torch.equal(inputs.hidden_BTD, hidden)
    assert "position_embeddings" in inputs.kwargs and inputs.kwargs["use_cache"] is False
    language_model = model.model.language_model
    with torch.no_grad():
        h = inputs.hidden_BTD
        for layer in language_model.layers:
            out = layer(h, **inputs.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        expected = language_model(inputs_embeds=hidden, use_cache=False).last_hidden_state
    torch.testing.assert_close(language_model.norm(h), expected)


def test_capture_refuses_mixed_layer_types(tiny, monkeypatch):
    model, _, _ = tiny
    config = model.model.language_model.config
    monkeypatch.setattr(config, "layer_types", ["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="attention types"):
        capture_layer_inputs(model, torch.zeros(1, 4, 128))


def test_calibration_inputs_stats(mmpr_dir, tiny):
    model, _, template = tiny
    cal = mmpr_samples(mmpr_dir, template, num_samples=3, max_response_tokens=8, tile_size=224, seed=0)
    inputs, stats = calibration_inputs(model, cal.samples, block_size=50, device="cpu")
    total = sum(s.num_tokens for s in cal.samples)
    tiles = sum(len(s.pixel_values) for s in cal.samples if s.pixel_values is not None)
    assert stats == {"num_samples": 3, "num_tokens": total, "num_rows": total // 50, "block_size": 50,
                     "num_image_tokens": TOKENS_PER_TILE * tiles}
    assert inputs.hidden_BTD.shape == (total // 50, 50, 128)
    stream = torch.cat([sample_embeddings(model, s, "cpu") for s in cal.samples])
    torch.testing.assert_close(inputs.hidden_BTD.reshape(-1, 128), stream[: (total // 50) * 50])
    with pytest.raises(ValueError, match="no calibration samples"):
        calibration_inputs(model, [], device="cpu")
