"""Per-sequence attention caches. GQA keeps keys and values; MLA keeps only the normalised latent and the
rotated rope key (the compressed form), never expanded K/V."""

from __future__ import annotations

import torch

from ..models.spec import ArchSpec, GQASpec


class KVCache:
    """Cache for one sequence: per layer, one or two growable tensors of [capacity, ...]."""

    def __init__(self, spec: ArchSpec, dtype: torch.dtype, device: torch.device | str, capacity: int = 256):
        a = spec.attention
        if isinstance(a, GQASpec):
            self._shapes = ((a.num_kv_heads, a.head_dim), (a.num_kv_heads, a.head_dim))
        else:
            self._shapes = ((a.kv_lora_rank,), (a.qk_rope_head_dim,))
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        self._capacity = capacity
        self._store = [[torch.empty(capacity, *shape, dtype=dtype, device=self.device) for shape in self._shapes]
                       for _ in spec.layers]

    def append(self, layer: int, first: torch.Tensor, second: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write entries for positions [start, start + T) of ``layer``; return the cache up to start + T."""
        end = start + first.shape[0]
        store = self._store[layer]
        if end > store[0].shape[0]:
            new_cap = max(end, 2 * store[0].shape[0])
            for i, t in enumerate(store):
                grown = torch.empty(new_cap, *t.shape[1:], dtype=t.dtype, device=t.device)
                grown[: t.shape[0]] = t
                store[i] = grown
        store[0][start:end] = first
        store[1][start:end] = second
        return store[0][:end], store[1][:end]

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (e.g. to reuse a shared prefix)."""
        self.length = min(self.length, length)
