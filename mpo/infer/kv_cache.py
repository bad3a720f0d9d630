"""Preallocated KV cache of the fast engine and the prompt prefix that its rows copy from.

Layout: one tensor for all keys and one for all values, ``[layers, rows, kv_heads, capacity,
head_dim]``. Each row is an independent sequence with its own length, so rows of different prompts
(and prompts of different lengths) share a batch without padding tokens: a row's slots
``[0, length)`` hold its tokens and the rest are ignored by attention. The tensors are allocated
once and never move, which is what a captured CUDA graph needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PrefixKV", "StaticKVCache"]


@dataclass
class PrefixKV:
    """Keys/values of one prompt after a batch-1 prefill, plus its next-token logits.

    Attributes:
        keys: [layers, kv_heads, length, head_dim], rotary already applied.
        values: [layers, kv_heads, length, head_dim].
        logits: float32 [vocab], the model's logits for the first new token.
    """

    keys: torch.Tensor
    values: torch.Tensor
    logits: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class StaticKVCache:
    """K/V storage for `num_rows` sequences of up to `capacity` tokens each.

    Args:
        num_layers, num_kv_heads, head_dim: the language model's attention shape.
        num_rows: sequences decoded together (the decode batch size).
        capacity: slots per row; a row's prompt plus its new tokens must fit.
        dtype, device: storage dtype (the model's) and device.
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_rows: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        if min(num_layers, num_kv_heads, head_dim, num_rows, capacity) < 1:
            raise ValueError("cache dimensions must all be >= 1, got "
                             f"layers={num_layers} kv_heads={num_kv_heads} head_dim={head_dim} "
                             f"rows={num_rows} capacity={capacity}")
        shape = (num_layers, num_rows, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_rows(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def load_prefix(self, rows: torch.Tensor, prefix: PrefixKV) -> None:
        """Copy a prompt's K/V into slots [0, prefix.length) of each row in `rows` (int64 [m])."""
        length = prefix.length
        if length > self.capacity:
            raise ValueError(f"prompt of {length} tokens does not fit a cache of {self.capacity} slots")
        m = rows.numel()
        # One copy for all layers and rows: [L, kvH, P, D] broadcast over the m rows.
        self.keys[:, rows, :, :length] = prefix.keys.unsqueeze(1).expand(-1, m, -1, -1, -1)
        self.values[:, rows, :, :length] = prefix.values.unsqueeze(1).expand(-1, m, -1, -1, -1)

    def write(self, layer: int, positions_B: torch.Tensor, keys_BKD: torch.Tensor, values_BKD: torch.Tensor) -> None:
        """Store one new token per row at slot positions_B[r] (in place, graph-safe).

        keys_BKD / values_BKD: [rows, kv_heads, head_dim].
        """
        rows, kv_heads, _, head_dim = self.keys.shape[1:]
        index = positions_B.view(rows, 1, 1, 1).expand(rows, kv_heads, 1, head_dim)
        self.keys[layer].scatter_(2, index, keys_BKD.unsqueeze(2).to(self.keys.dtype))
        self.values[layer].scatter_(2, index, values_BKD.unsqueeze(2).to(self.values.dtype))
