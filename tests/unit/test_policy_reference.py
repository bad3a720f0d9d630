"""Policy log-probs (vision once per pair, chunked head) vs HF's full forward; the three references agree."""

from __future__ import annotations

import pytest
import torch

from conftest import write_image, write_mmpr
from mpo.data.collate import collate_pairs
from mpo.data.dataset import DataConfig, MMPRDataset
from mpo.data.template import ChatTemplate
from mpo.model.load import load_model, load_processor
from mpo.train.logps import naive_sequence_logps
from mpo.train.policy import batch_logps, chosen_logps, unwrap_internvl
from mpo.train.reference import CachedReference, FrozenReference, LoraReference, compute_reference_table


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mmpr")
    write_image(root / "a.png", (300, 200), (200, 10, 10))
    write_image(root / "b.png", (100, 300), (10, 200, 10))
    records = [
        {"image": "a.png", "question": "Colour?", "chosen": "It is red. Final answer: A", "rejected": "Blue. Final answer: B"},
        {"question": "Two plus two?", "chosen": "Four.", "rejected": "Five, I think."},
        {"image": "b.png", "question": "Shape?", "chosen": "A tall green box", "rejected": "Round"},
    ]
    write_mmpr(root, records)
    processor = load_processor(tiny_model_dir)
    template = ChatTemplate(processor.tokenizer, tokens_per_tile=256, system_prompt="Be brief.")
    dataset = MMPRDataset(root, template, DataConfig(max_length=4096, max_dynamic_patch=2))
    model = load_model(tiny_model_dir, dtype="float32", attn_implementation="eager").eval()
    return model, dataset, template


def test_batch_logps_match_full_hf_forward(setup):
    model, dataset, template = setup
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collate_pairs(samples, template.pad_id)
    with torch.no_grad():
        chosen, rejected, n_c, n_r = batch_logps(model, batch, chunk_size=7)
        # reference twin: HF forward per row with that row's own tiles, full logits, naive log-softmax
        expect = []
        for row in range(batch.input_ids.shape[0]):
            pair = row % batch.num_pairs
            start = sum(batch.num_tiles[:pair])
            pixels = batch.pixel_values[start:start + batch.num_tiles[pair]] if batch.num_tiles[pair] else None
            out = model(input_ids=batch.input_ids[row:row + 1], attention_mask=batch.attention_mask[row:row + 1],
                        pixel_values=pixels)
            lp, _ = naive_sequence_logps(out.logits[:, :-1], batch.labels[row:row + 1, 1:])
            expect.append(lp[0])
    expect = torch.stack(expect)
    torch.testing.assert_close(torch.cat([chosen, rejected]), expect, rtol=1e-4, atol=1e-3)
    assert n_c.tolist() == [len(s.chosen_ids) for s in samples]
    assert n_r.tolist() == [len(s.rejected_ids) for s in samples]


def test_chosen_only_path_matches_the_paired_one(setup):
    """The SFT-only fast path (chosen rows only) against batch_logps's chosen half: values and gradients."""
    model, dataset, template = setup
    batch = collate_pairs([dataset[i] for i in range(len(dataset))], template.pad_id)
    single = batch.chosen_only()
    assert not single.paired and single.input_ids.shape[0] == batch.num_pairs
    assert single.input_ids.shape[1] == int(batch.attention_mask[: batch.num_pairs].sum(1).max())
    assert single.chosen_only() is single and single.num_tokens == int(batch.attention_mask[:3].sum())
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for run in (lambda: batch_logps(model, batch, chunk_size=5)[::2], lambda: chosen_logps(model, batch, chunk_size=5)):
        model.zero_grad()
        logps, tokens = run()
        (-(logps / tokens).mean()).backward()
        grads.append([p.grad.clone() for p in params])
        values = (logps.detach(), tokens)
        if len(grads) == 1:
            expected = values
    torch.testing.assert_close(values[0], expected[0], rtol=1e-5, atol=1e-4)
    assert values[1].tolist() == expected[1].tolist()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.zero_grad()
    with pytest.raises(ValueError, match="needs a paired batch"):
        batch_logps(model, single)


def test_three_reference_strategies_agree(setup, tiny_model_dir):
    model, dataset, template = setup
    frozen = FrozenReference(load_model(tiny_model_dir, dtype="float32", attn_implementation="eager"), chunk_size=16)
    chosen, rejected = compute_reference_table(frozen, dataset, rank=0, world_size=1, device=torch.device("cpu"),
                                               dtype=torch.float32)
    cached = CachedReference(chosen, rejected)

    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_model_dir, dtype="float32", attn_implementation="eager")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)$"))
    with torch.no_grad():  # make the adapters matter, so "disabled" is a real check
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora = LoraReference(peft_model, chunk_size=16)

    batch = collate_pairs([dataset[i] for i in range(len(dataset))], template.pad_id)
    f_c, f_r = frozen.logps(batch)
    for other in (cached, lora):
        o_c, o_r = other.logps(batch)
        torch.testing.assert_close(o_c, f_c, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(o_r, f_r, rtol=1e-4, atol=1e-3)
    with torch.no_grad():  # with adapters on, the policy differs from the reference
        on_c, _, _, _ = batch_logps(peft_model, batch)
    assert not torch.allclose(on_c, f_c, atol=1e-2)
    assert unwrap_internvl(peft_model) is peft_model.get_base_model()


def test_cached_reference_refuses_missing_entries():
    cached = CachedReference(torch.tensor([1.0, float("nan")]), torch.tensor([2.0, 3.0]))

    class B:
        indices = torch.tensor([1])
        input_ids = torch.zeros(2, 1)

    with pytest.raises(RuntimeError, match="missing"):
        cached.logps(B())
