"""Settings of `mpo demo`: sizes of the synthetic task and of each stage, with a full and a quick preset.

The training hyperparameters (learning rates, β, batch sizes, steps) live in the trainer experiments
`configs/exp/demo_sft.yaml` and `configs/exp/demo_mpo.yaml`, so `python launch/train.py +exp=demo_mpo`
runs exactly what the demo runs; the settings here only override step counts for the quick preset.
The values were chosen by measurement (docs/demo_notes.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class DemoSettings:
    """What one demo run does. Counts are questions (one image each); lengths are tokens."""

    num_train: int = 1200  # SFT questions (each with a correct chain-of-thought answer)
    num_build: int = 300  # questions the SFT model answers to build preference pairs
    num_test: int = 500  # held-out questions every stage is evaluated on
    image_size: int = 224  # synthetic image side = the model's tile side (1 tile, 64 image tokens)
    shape: str = "demo"  # mpo.model.shapes.SHAPES entry of the starting model
    sft_steps: int | None = None  # None: demo_sft.yaml's max_steps
    mpo_steps: int | None = None  # None: demo_mpo.yaml's max_steps
    samples_per_question: int = 8  # K sampled answers per build question
    pairs_per_question: int = 4  # N pairs kept per question and pair kind
    temperature: float = 1.0  # sampling temperature of the pair builder
    max_new_tokens: int = 128  # per sampled or evaluated answer (the templated answers are < 100)
    dropout_ntp_share: float = 0.2  # share of build questions whose answer is withheld (Dropout-NTP)
    awq_calibration_samples: int = 64  # chosen answers (with images) the AWQ scales are fitted on
    eval_batch_size: int = 32  # requests per generate call during evaluation

    def __post_init__(self):
        problems = []
        for name in ("num_train", "num_build", "num_test", "samples_per_question", "pairs_per_question",
                     "max_new_tokens", "awq_calibration_samples", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        for name in ("sft_steps", "mpo_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r} must be a positive integer (or None for the experiment's)")
        if self.samples_per_question < 2:
            problems.append("samples_per_question must be >= 2: a pair needs a right and a wrong answer")
        if not 0 <= self.dropout_ntp_share <= 1:
            problems.append(f"dropout_ntp_share={self.dropout_ntp_share} must be in [0, 1]")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be > 0: greedy samples are all identical")
        if problems:
            raise ValueError("invalid demo settings:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


FULL = DemoSettings()

# CI / smoke preset: every stage runs for real on a few questions; accuracies are not meaningful.
QUICK = replace(FULL, num_train=32, num_build=12, num_test=12, sft_steps=24, mpo_steps=6,
                samples_per_question=4, pairs_per_question=2, max_new_tokens=64, dropout_ntp_share=0.5,
                awq_calibration_samples=8)

PRESETS = {"full": FULL, "quick": QUICK}
