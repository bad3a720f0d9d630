"""Quantize a native InternVL checkpoint to 4-bit AWQ (AutoAWQ GEMM layout) with Hydra overrides.

    python -m mpo.export_awq model=runs/4b/final data=/data/MMPR output_dir=runs/4b/awq
    python -m mpo.export_awq model=runs/4b/final output_dir=runs/4b/awq   # text-only calibration
    mpo export-awq model=... output_dir=... quality.enabled=true calibration.num_samples=64

Settings and their defaults: configs/export_awq.yaml (typed by `mpo.quant.export.ExportConfig`, so
a misspelt key fails); the pipeline: `mpo.quant.export`.

The yaml is composed through Hydra's compose API from the ConfigStore, not from the configs/ search
path: configs/ (and the `mpo` package) hold training groups named `model/` and `data/`, which
would turn `model=DIR` into a group choice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mpo.quant.export import ExportConfig, export_awq

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "export_awq.yaml"


def register_configs() -> None:
    """Store the schema (`export_awq_schema`) and configs/export_awq.yaml (`export_awq`)."""
    if not CONFIG_FILE.is_file():
        raise FileNotFoundError(f"{CONFIG_FILE} not found; run from a source checkout (pip install -e .)")
    store = ConfigStore.instance()
    store.store(name="export_awq_schema", node=ExportConfig)
    store.store(name="export_awq", node=OmegaConf.load(CONFIG_FILE))


def compose(overrides: list[str]) -> ExportConfig:
    """The validated config for Hydra ``overrides`` (``key=value``) over configs/export_awq.yaml."""
    register_configs()
    with hydra.initialize(version_base="1.3", config_path=None):
        cfg = hydra.compose(config_name="export_awq", overrides=overrides)
    return to_export_config(cfg)


def to_export_config(cfg: DictConfig) -> ExportConfig:
    """Validated dataclass from a composed config (missing values raise)."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, ExportConfig):
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExportConfig), cfg))
    return obj


def _summary(report: dict) -> str:
    mse = [(layer["output_mse"]["awq"], layer["output_mse"]["rtn"]) for layer in report["layers"]]
    ratio = sum(a for a, _ in mse) / max(sum(r for _, r in mse), 1e-30)
    lines = [f"wrote {report['config']['output_dir']}: {len(mse)} layers in {report['total_time_s']:.1f} s, "
             f"layer-output MSE AWQ / RTN = {ratio:.3f}"]
    if "quality" in report:
        ppl = report["quality"]["perplexity"]
        lines.append("held-out perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the export; argv are Hydra overrides. Returns 0, or 2 on a configuration/user error."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    if overrides[:1] in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[0] + "\n\n" + CONFIG_FILE.read_text())
        return 0
    try:
        config = compose(overrides)
        report = export_awq(config)
    except (HydraException, OmegaConfBaseException, ValueError, FileNotFoundError) as err:
        print(f"mpo.export_awq: error: {err}", file=sys.stderr)
        return 2
    print(_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
