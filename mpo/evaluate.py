"""`python -m mpo.evaluate`: evaluate checkpoints on VLMEvalKit benchmarks (thin CLI over mpo.eval.runner).

    python -m mpo.evaluate model=runs/mpo/final benchmarks=[mmstar,ocrbench] data_root=$HOME/LMUData output_dir=out/eval
    python -m mpo.evaluate 'model=[ckpt/InternVL2_5-4B,ckpt/InternVL2_5-4B-MPO]' cot=true output_dir=out/cmp
    python -m mpo.evaluate predictions=preds.jsonl benchmarks=[mmstar] data_root=$HOME/LMUData output_dir=out/score
    python -m mpo.evaluate model=runs/tiny/final 'benchmarks=[custom:/data/synth/test/synthetic.jsonl]' limit=20
    python -m mpo.evaluate model=runs/tiny/final 'benchmarks=[custom:/data/synth/test/synthetic.jsonl]' cot=true samples=8

Keys (configs/evaluate.yaml, typed by mpo.eval.config.EvalConfig, so a misspelt key fails): model,
benchmarks, data_root, output_dir, predictions, cot, max_new_tokens, batch_size, limit, device, dtype,
system_prompt, max_tiles, progress, samples, sample_temperature, sample_seed (samples=K also samples K
answers per question of a custom benchmark and reports mean@K, maj@K and pass@K beside the greedy score).
Rerunning the same command resumes from the saved predictions.
A user error (missing file, unknown benchmark, bad value) prints one message and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mpo.eval.config import EvalConfig
from mpo.eval.runner import run_evaluation

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "evaluate.yaml"
USAGE_ERROR = 2


def register_configs() -> None:
    """Register the schema and configs/evaluate.yaml with Hydra's ConfigStore.

    The yaml is served from the ConfigStore, not through ``config_path=configs``: that folder holds
    the training groups (model/, data/, …), and Hydra would read ``model=DIR`` as picking a config of
    the ``model`` group instead of setting our ``model`` key.
    """
    # hydra.run.dir is ${output_dir}: without expansion a quoted "~/out" would create a folder named "~".
    if not OmegaConf.has_resolver("mpo.expanduser"):
        OmegaConf.register_new_resolver("mpo.expanduser", lambda path: str(Path(path).expanduser()))
    store = ConfigStore.instance()
    store.store(name="evaluate_schema", node=EvalConfig)
    store.store(name="evaluate", node=OmegaConf.load(CONFIG_FILE))


register_configs()


def to_eval_config(cfg: DictConfig) -> EvalConfig:
    """Composed Hydra config → validated :class:`EvalConfig` (ValueError lists every problem)."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, EvalConfig):  # composed without the schema: build it explicitly
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg))
    return obj


@hydra.main(config_path=None, config_name="evaluate", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_evaluation(to_eval_config(cfg))
    except (ValueError, FileNotFoundError) as error:
        # User errors: the message says what to fix; a traceback would only bury it.
        print(f"mpo.evaluate: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point for `mpo evaluate ARGS` and `python -m mpo.evaluate ARGS` (Hydra overrides)."""
    if argv is not None:
        sys.argv = [sys.argv[0] if sys.argv else "mpo.evaluate", *argv]
    _hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
