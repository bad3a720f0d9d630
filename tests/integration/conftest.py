"""The session-wide SLURM test cluster (see tests/slurm_cluster.py); tests using it are marked `slurm`."""

from __future__ import annotations

import pytest
from slurm_cluster import SlurmCluster, slurm_available


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM cluster, shared by the session; skips where SLURM is not installed."""
    ok, reason = slurm_available()
    if not ok:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        yield cluster
