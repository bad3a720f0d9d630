"""CUDA-graph capture of an in-place decode step.

A decode step at small batch is hundreds of short kernels; launched from Python each costs more
CPU time than the GPU needs to run it. Captured once into a CUDA graph, a step is one launch. The
captured function must take no arguments and touch only tensors that outlive the graph (the
static KV cache and per-row state of `batch.DecodeBatch`): replay re-runs the same kernels on the
same addresses.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["CapturedStep"]


class CapturedStep:
    """`fn` captured into a CUDA graph; `replay()` runs it again.

    Args:
        fn: zero-argument function whose effects are in-place writes to long-lived tensors. It is
            run `warmup` times eagerly first (on a side stream, as capture requires; this also
            compiles Triton kernels and sizes cuBLAS workspaces), so it must be harmless to repeat.
        pool: memory pool handle shared by several graphs (`torch.cuda.graph_pool_handle()`);
            graphs that never run concurrently can share one, which saves their temporaries.
        warmup: eager runs before capture.
    """

    def __init__(self, fn: Callable[[], None], *, pool=None, warmup: int = 2):
        if not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device; run the step eagerly instead")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def replay(self) -> None:
        self.graph.replay()
