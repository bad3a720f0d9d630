"""Shard files, resume after a kill, and the merge (data_pipeline/writer.py + driver stages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_build_pairs_driver import QUESTIONS, ScriptedEngine, make_cfg, make_inputs

from data_pipeline.driver import build_pairs, shard_of
from data_pipeline.writer import MergeError, ShardWriter, read_shard_lines, shard_path
from mpo.build_pairs import ShardSection

OUTPUTS = ("meta.json", "stats.json", "hard_questions.jsonl", "rejects.jsonl", "count_pairs_vqa_correctness_rules.jsonl",
           "count_pairs_vqa_format_rules.jsonl", "caption_prefix_pair_sr0.5_wo_image.jsonl")


def outputs(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "build_config.json"}
    assert set(OUTPUTS) <= files.keys()
    return files


def shard_ids(path: Path) -> list[str]:
    return [line["id"] for line in read_shard_lines(path)]


def test_resume_after_kill_skips_done_questions_and_matches_a_clean_run(tmp_path):
    make_inputs(tmp_path)
    clean = build_pairs(make_cfg(tmp_path, out="clean"), engine=ScriptedEngine(seeded=True))

    with pytest.raises(KeyboardInterrupt):  # killed during the 4th question (sampled one at a time)
        build_pairs(make_cfg(tmp_path, questions_per_call=1), engine=ScriptedEngine(seeded=True, crash_after=3))
    path = shard_path(tmp_path / "out", 0, 1)
    assert len(shard_ids(path)) == 3 and not (tmp_path / "out" / "meta.json").exists()
    with path.open("ab") as fh:  # the kill also cut a line in half
        fh.write(b'{"id": "n2", "source": "capt')

    engine = ScriptedEngine(seeded=True)
    resumed = build_pairs(make_cfg(tmp_path), engine=engine)  # questions in one call now: same results
    assert resumed.shard.num_resumed == 3 and resumed.shard.num_done == 3
    ids = shard_ids(path)
    assert sorted(ids) == sorted(q["id"] for q in QUESTIONS if q["id"] != "bad")  # none missing
    assert len(ids) == len(set(ids))  # none twice
    assert path.read_bytes().endswith(b"\n") and b'"capt\n' not in path.read_bytes()  # partial tail cut
    assert outputs(resumed.out_dir) == outputs(clean.out_dir)

    again = build_pairs(make_cfg(tmp_path), engine=ScriptedEngine(crash_after=0))  # nothing left: no generate
    assert again.shard.num_done == 0 and again.shard.num_resumed == 6


def test_stop_after_questions_then_resume(tmp_path):
    make_inputs(tmp_path)
    first = build_pairs(make_cfg(tmp_path, stop_after_questions=2), engine=ScriptedEngine())
    assert first.shard.stopped_early and first.shard.num_done == 2 and first.merge is None
    second = build_pairs(make_cfg(tmp_path), engine=ScriptedEngine())
    assert second.shard.num_done == 4 and second.merge is not None


def test_two_shards_merged_equal_one_shard(tmp_path):
    make_inputs(tmp_path)
    one = build_pairs(make_cfg(tmp_path, out="one"), engine=ScriptedEngine(seeded=True))
    owners = {q["id"]: shard_of(q["id"], 2) for q in QUESTIONS}
    assert set(owners.values()) == {0, 1}  # both shards own questions
    for index in (1, 0):  # order does not matter
        result = build_pairs(make_cfg(tmp_path, out="two", stage="sample", shard=ShardSection(index, 2)),
                             engine=ScriptedEngine(seeded=True))
        assert result.merge is None
        assert set(shard_ids(result.shard.path)) == {i for i, s in owners.items() if s == index and i != "bad"}
    merged = build_pairs(make_cfg(tmp_path, out="two", stage="merge", model_dir=None, questions=None, shard=ShardSection()))
    assert outputs(merged.out_dir) == outputs(one.out_dir)
    # the seed reaches the samples: another run seed gives other pairs
    other = build_pairs(make_cfg(tmp_path, out="seed1", seed=1), engine=ScriptedEngine(seeded=True))
    assert outputs(other.out_dir) != outputs(one.out_dir)


def test_resume_with_another_shard_count(tmp_path):
    make_inputs(tmp_path)
    one = build_pairs(make_cfg(tmp_path, out="one"), engine=ScriptedEngine(seeded=True))
    first = build_pairs(make_cfg(tmp_path, stop_after_questions=3), engine=ScriptedEngine(seeded=True))
    done = set(shard_ids(first.shard.path))
    sampled = []
    for index in (0, 1):  # re-sharded: the questions done by the 1-shard run are not sampled again
        result = build_pairs(make_cfg(tmp_path, stage="sample", shard=ShardSection(index, 2)),
                             engine=ScriptedEngine(seeded=True))
        sampled += shard_ids(result.shard.path)
    assert not done & set(sampled) and len(done) + len(sampled) == 6
    merged = build_pairs(make_cfg(tmp_path, stage="merge", shard=ShardSection()))
    assert outputs(merged.out_dir) == outputs(one.out_dir)


def test_merge_refuses_missing_shards(tmp_path):
    make_inputs(tmp_path)
    build_pairs(make_cfg(tmp_path, stage="sample", shard=ShardSection(0, 2)), engine=ScriptedEngine())
    with pytest.raises(MergeError, match=r"have no result yet \(of 2 shards: shard 1 misses \d+\); shard files missing: "
                                         r"shard-00001-of-00002.jsonl. Run \(or rerun, it resumes\) stage=sample"):
        build_pairs(make_cfg(tmp_path, stage="merge", model_dir=None, questions=None, shard=ShardSection()))
    assert not (tmp_path / "out" / "meta.json").exists()
    # stage=all with several shards samples only; the last shard's merge is a separate step
    result = build_pairs(make_cfg(tmp_path, shard=ShardSection(1, 2)), engine=ScriptedEngine())
    assert result.merge is None
    assert build_pairs(make_cfg(tmp_path, stage="merge", shard=ShardSection())).merge.files


def test_merge_without_sampling_and_changed_questions(tmp_path):
    make_inputs(tmp_path)
    with pytest.raises(ValueError, match="nothing was sampled there"):
        build_pairs(make_cfg(tmp_path, stage="merge", model_dir=None, questions=None, shard=ShardSection()))
    build_pairs(make_cfg(tmp_path), engine=ScriptedEngine())
    lines = read_shard_lines(shard_path(tmp_path / "out", 0, 1))
    extra = dict(lines[0], id="ghost")
    with shard_path(tmp_path / "out", 0, 1).open("a") as fh:
        fh.write(json.dumps(extra) + "\n")
    with pytest.raises(MergeError, match="1 question ids not in .*questions changed since sampling"):
        build_pairs(make_cfg(tmp_path, stage="merge", shard=ShardSection()))


def test_other_settings_are_refused_on_resume(tmp_path):
    make_inputs(tmp_path)
    build_pairs(make_cfg(tmp_path, stop_after_questions=1), engine=ScriptedEngine())
    with pytest.raises(ValueError, match=r"built with other settings \(samples_per_question: 4 -> 8\)"):
        build_pairs(make_cfg(tmp_path, samples_per_question=8), engine=ScriptedEngine())
    # device, progress, sharding and stage may change between runs
    build_pairs(make_cfg(tmp_path, device="cpu", progress=False, stage="sample"), engine=ScriptedEngine())


def test_shard_writer_lock_durability_and_corrupt_lines(tmp_path, capsys):
    path = shard_path(tmp_path, 0, 1)
    with ShardWriter(path) as writer:
        writer.write({"id": "a", "x": 1})
        with pytest.raises(ValueError, match="locked by another process"):
            ShardWriter(path)
        assert path.read_text() == '{"id": "a", "x": 1}\n'  # on disk before write() returns
    with path.open("a") as fh:
        fh.write("{broken json\n" + '{"id": "b"}\n' + '{"id": "c", "trunc')
    assert [line["id"] for line in read_shard_lines(path)] == ["a", "b"]
    assert "ignoring an unreadable line" in capsys.readouterr().err
    with ShardWriter(path):
        pass
    assert path.read_text().endswith('{"id": "b"}\n')  # the partial last line is cut on open
