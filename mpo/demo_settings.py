"""Settings of `mpo demo`: sizes of the synthetic task and of each stage, with a full and a quick preset.

The training hyperparameters (learning rates, β, batch sizes, steps) live in the trainer experiments
`configs/exp/demo_sft.yaml` and `configs/exp/demo_mpo.yaml`, so `python launch/train.py +exp=demo_mpo`
runs exactly what the demo runs; the settings here only override step counts for the quick preset.
The values were chosen by measurement (docs/demo_notes.md).
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class DemoSettings:
    """What one demo run does. Counts are questions (one image each); lengths are tokens."""

    num_train: int = 1000  # SFT questions (each with a correct chain-of-thought answer)
    num_build: int = 3000  # questions the SFT model answers to build preference pairs (new images: see docs)
    num_test: int = 500  # held-out questions every stage is evaluated on
    image_size: int = 224  # synthetic image side = the model's tile side (1 tile, 64 image tokens)
    fixed_options: bool = True  # choice options in one canonical order: the letter follows from the answer
    scene_description: bool = True  # SFT reasoning opens with every object of the scene (generate_task(...))
    kinds: str = "grid"  # question kinds: "grid", "mixed" or a comma list (data_pipeline.synthetic.resolve_kinds)
    shape: str = "demo"  # mpo.model.shapes.SHAPES entry of the starting model
    sft_steps: int | None = None  # None: demo_sft.yaml's max_steps
    mpo_steps: int | None = None  # None: demo_mpo.yaml's max_steps
    samples_per_question: int = 8  # K sampled answers per build question
    pairs_per_question: int = 4  # N pairs kept per question and pair kind
    temperature: float = 0.7  # sampling temperature of the pair builder (1.0 lost more: docs/demo_notes.md)
    max_new_tokens: int = 128  # per sampled or evaluated answer (the templated answers are < 100)
    dropout_ntp_share: float = 0.2  # share of build questions whose answer is withheld (Dropout-NTP)
    awq_calibration_samples: int = 64  # chosen answers (with images) the AWQ scales are fitted on
    eval_batch_size: int = 128  # requests per generate call during evaluation
    consistency_samples: int = 8  # K answers sampled per held-out question at `temperature` (maj@K, pass@K); 0 = off
    decode_rows: int = 256  # answers the engine decodes at once (pair building and evaluation)
    sft_overrides: tuple[str, ...] = ()  # extra Hydra overrides for the SFT trainer run, e.g. "optim.lr=1e-3"
    mpo_overrides: tuple[str, ...] = ()  # extra Hydra overrides for the MPO trainer run, e.g. "loss.beta=0.3"

    def __post_init__(self):
        problems = []
        for name in ("num_train", "num_build", "num_test", "samples_per_question", "pairs_per_question",
                     "max_new_tokens", "awq_calibration_samples", "eval_batch_size", "decode_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        for name in ("sft_steps", "mpo_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r} must be a positive integer (or None for the experiment's)")
        if isinstance(self.consistency_samples, bool) or not isinstance(self.consistency_samples, int) \
                or self.consistency_samples == 1 or self.consistency_samples < 0:
            problems.append(f"consistency_samples={self.consistency_samples!r} must be 0 (off) or an integer >= 2")
        if self.samples_per_question < 2:
            problems.append("samples_per_question must be >= 2: a pair needs a right and a wrong answer")
        if not 0 <= self.dropout_ntp_share <= 1:
            problems.append(f"dropout_ntp_share={self.dropout_ntp_share} must be in [0, 1]")
        for name in ("fixed_options", "scene_description"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be True or False")
        from data_pipeline.synthetic import resolve_kinds

        try:
            resolve_kinds(self.kinds)
        except ValueError as exc:
            problems.append(f"kinds={self.kinds!r}: {exc}")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be > 0: greedy samples are all identical")
        for name in ("sft_overrides", "mpo_overrides"):
            bad = [o for o in getattr(self, name) if not isinstance(o, str) or "=" not in o]
            if bad:
                problems.append(f"{name} entries must be Hydra overrides KEY=VALUE, got {bad!r}")
        if problems:
            raise ValueError("invalid demo settings:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    def with_values(self, assignments: list[str]) -> "DemoSettings":
        """A copy with ``KEY=VALUE`` assignments applied (``--set`` on the command line).

        Values are parsed by the field's type: ``num_train=2000``, ``temperature=0.7``,
        ``sft_steps=none`` (back to the experiment's own). The override tuples are not settable here.
        """
        types = typing.get_type_hints(DemoSettings)
        scalar = {f.name for f in fields(self)} - {"sft_overrides", "mpo_overrides"}
        changes = {}
        for item in assignments:
            key, sep, text = item.partition("=")
            if not sep or key not in scalar:
                raise ValueError(f"--set {item!r}: use KEY=VALUE with KEY one of {sorted(scalar)}")
            changes[key] = _parse(key, text, types[key])
        return replace(self, **changes)


def _parse(key: str, text: str, kind) -> object:
    """``text`` as a value of the field type ``kind`` (int, float, bool, str; "none" for an optional field)."""
    optional = type(None) in typing.get_args(kind)
    if optional and text.lower() in ("none", "null"):
        return None
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--set {key}={text!r}: expected true or false")
    base = next((t for t in (int, float, str) if t is kind or t in typing.get_args(kind)), str)
    try:
        return base(text)
    except ValueError:
        raise ValueError(f"--set {key}={text!r}: expected {base.__name__}") from None


FULL = DemoSettings()

# CI / smoke preset: every stage runs for real on a few questions; accuracies are not meaningful.
QUICK = replace(FULL, num_train=32, num_build=12, num_test=12, sft_steps=10, mpo_steps=4,
                samples_per_question=4, pairs_per_question=2, max_new_tokens=64, dropout_ntp_share=0.5,
                awq_calibration_samples=8, consistency_samples=2)

PRESETS = {"full": FULL, "quick": QUICK}
