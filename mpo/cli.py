"""The `mpo` command: one entry point whose subcommands forward to each stage's own CLI.

    mpo tiny OUT_DIR            write a random tiny InternVL checkpoint (python -m mpo.model.tiny)
    mpo convert SRC DST         original InternVL2.5 checkpoint -> native (python -m mpo.model.convert)
    mpo validate MMPR_DIR       check an MMPR dataset (python -m mpo.data.validate)
    mpo synthetic OUT_DIR       generate the synthetic visual task (python -m data_pipeline.synthetic)
    mpo build-pairs k=v ...     build MMPR preference pairs (python -m mpo.build_pairs)
    mpo train [overrides...]    train with Hydra overrides (python launch/train.py)
    mpo export-awq k=v ...      4-bit AWQ export (python -m mpo.export_awq)
    mpo evaluate k=v ...        benchmarks (python -m mpo.evaluate)
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS = {
    "tiny": ("mpo.model.tiny", "main", "write a random tiny InternVL checkpoint"),
    "convert": ("mpo.model.convert", "main", "convert an original InternVL2.5 checkpoint to the native layout"),
    "validate": ("mpo.data.validate", "main", "validate an MMPR directory (counts and rejects)"),
    "synthetic": ("data_pipeline.synthetic", "main", "generate the synthetic visual task"),
    "build-pairs": ("mpo.build_pairs", "main", "build MMPR preference pairs with the model (Hydra overrides)"),
    "train": ("mpo.train.cli", "main", "train with MPO (Hydra overrides, e.g. +exp=tiny_cpu)"),
    "export-awq": ("mpo.export_awq", "main", "quantize a checkpoint to 4-bit AWQ (model=DIR data=MMPR output_dir=OUT)"),
    "evaluate": ("mpo.evaluate", "main", "evaluate checkpoints on benchmarks (e.g. model=DIR benchmarks=[mmstar])"),
    "demo": ("mpo.demo", "main", "the whole pipeline (SFT, pairs, MPO, AWQ, evaluation) on the synthetic task"),
}


def usage() -> str:
    lines = ["usage: mpo SUBCOMMAND [args...]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "`mpo SUBCOMMAND --help` shows a subcommand's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mpo: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func, _ = SUBCOMMANDS[name]
    func_obj = getattr(importlib.import_module(module_name), func)
    result = func_obj(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
