"""Train a vision-language model with MPO (thin entry point: compose the config, call the loop).

    python launch/train.py +exp=tiny_cpu
    torchrun --nproc_per_node 8 launch/train.py +exp=4b_mpo model.path=/ckpt/InternVL2_5-4B data.path=/data/MMPR
    python launch/train.py -m +exp=4b_mpo loss.beta=0.05,0.1 hydra/launcher=slurm
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable from a checkout without install

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mpo.config import register_configs, to_train_config  # noqa: E402

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from mpo.train.loop import train

    train(to_train_config(cfg))


if __name__ == "__main__":
    # only rank 0 writes Hydra's files in the shared run dir (torchrun sets RANK, srun SLURM_PROCID)
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    main()
