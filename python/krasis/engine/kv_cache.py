"""Per-sequence attention caches. GQA keeps keys and values; MLA keeps only the normalised latent and the
rotated rope key (the compressed form), never expanded K/V. Entries are stored in the compute dtype, or in
FP8 (e4m3) with one float32 scale per token and tensor, which halves the cache against BF16.

Linear-attention (Gated DeltaNet) layers keep no entries: the cache holds their per-sequence conv state and
recurrent state instead, carried from one forward call (prefill chunk, decode step) to the next. A recurrent
state cannot be rewound to an arbitrary earlier position, so :meth:`KVCache.truncate` on such a model keeps the
live state only when nothing is cut, else restores the state snapshot taken by :meth:`KVCache.snapshot` (at the
end of the last prompt) when the kept prefix reaches it, and otherwise starts the sequence over (length 0)."""

from __future__ import annotations

import math

import torch

from ..errors import InvalidInputError
from ..models.spec import ArchSpec, GQASpec

KV_DTYPES = ("auto", "bf16", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def kv_entry_shapes(spec: ArchSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-token shapes of a layer's two cached tensors (keys and values, or MLA latent and rope key)."""
    a = spec.attention
    if isinstance(a, GQASpec):
        return (a.num_kv_heads, a.head_dim), (a.num_kv_heads, a.head_dim)
    return (a.kv_lora_rank,), (a.qk_rope_head_dim,)


def kv_bytes_per_token(spec: ArchSpec, kv_dtype: str, compute_dtype: torch.dtype) -> int:
    """Bytes the cache holds per token over all layers."""
    values = sum(math.prod(s) for s in kv_entry_shapes(spec))
    layers = sum(layer.mixer == "attention" for layer in spec.layers)
    if kv_dtype == "fp8":
        return layers * (values + 2 * 4)
    size = 2 if kv_dtype == "bf16" else torch.finfo(compute_dtype).bits // 8
    return layers * values * size


def linear_state_bytes(spec: ArchSpec, compute_dtype: torch.dtype) -> int:
    """Bytes of one sequence's linear-attention state over all layers (0 without such layers), twice over: the
    live state and the snapshot kept for prefix reuse. Per layer: the conv state [C, kernel-1] in the compute
    dtype, C = 2 * key_dim + value_dim, and the recurrent state [Hv, Dk, Dv] in float32."""
    la = spec.linear_attention
    layers = sum(layer.mixer == "linear_attention" for layer in spec.layers)
    if la is None or not layers:
        return 0
    conv = (2 * la.key_dim + la.value_dim) * (la.conv_kernel - 1) * (torch.finfo(compute_dtype).bits // 8)
    recurrent = la.num_v_heads * la.k_head_dim * la.v_head_dim * 4
    return 2 * layers * (conv + recurrent)


def _to_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8: values [T, ...] -> (fp8 [T, ...], float32 scale [T])."""
    flat = t.reshape(t.shape[0], -1).float()
    scale = (flat.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
    return (flat / scale[:, None]).to(FP8).view(t.shape), scale


class KVCache:
    """Cache for one sequence: per layer, two tensors of [capacity, ...].

    kv_dtype "auto" stores the compute dtype, "bf16" bfloat16, "fp8" e4m3 with per-token scales (read back
    in the compute dtype). With ``max_tokens`` the capacity is fixed (a GPU cache sized by the VRAM plan)
    and a longer sequence is an error; without it the cache grows as needed.
    """

    def __init__(self, spec: ArchSpec, dtype: torch.dtype, device: torch.device | str, capacity: int = 256,
                 kv_dtype: str = "auto", max_tokens: int | None = None):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, not {kv_dtype!r}")
        self._shapes = kv_entry_shapes(spec)
        self.dtype, self.device, self.kv_dtype = dtype, torch.device(device), kv_dtype
        self.max_tokens = max_tokens
        store_dtype = {"auto": dtype, "bf16": torch.bfloat16, "fp8": FP8}[kv_dtype]
        self.length = 0
        cap = max_tokens if max_tokens is not None else capacity
        attention = [layer.mixer == "attention" for layer in spec.layers]
        # zeros, not empty: a decode graph attends over a fixed span whose unwritten tail is masked, and a masked
        # probability of 0 times a garbage NaN would still be NaN
        self._store = [[torch.zeros(cap, *shape, dtype=store_dtype, device=self.device) for shape in self._shapes]
                       if keeps else None for keeps in attention]
        self._scales = None
        if kv_dtype == "fp8":
            self._scales = [[torch.zeros(cap, dtype=torch.float32, device=self.device) for _ in self._shapes]
                            if keeps else None for keeps in attention]
        # linear-attention layers: (conv state, recurrent state) at position self.length, None before the first token
        self._linear: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(spec.layers)
        self.has_linear_state = not all(attention)
        self._snapshot: tuple[int, list] | None = None

    @property
    def capacity(self) -> int:
        return next(store[0].shape[0] for store in self._store if store is not None)

    def _grow(self, layer: int, end: int) -> None:
        if self.max_tokens is not None:
            raise InvalidInputError(f"the sequence needs {end} tokens of KV cache but the cache holds "
                                    f"{self.max_tokens}; shorten the prompt or give the cache more memory "
                                    "(--kv-cache-mb, or a larger --vram-budget-mb)")
        new_cap = max(end, 2 * self._store[layer][0].shape[0])
        for group in ([self._store[layer]] + ([self._scales[layer]] if self._scales else [])):
            for i, t in enumerate(group):
                grown = torch.empty(new_cap, *t.shape[1:], dtype=t.dtype, device=t.device)
                grown[: t.shape[0]] = t
                group[i] = grown

    def append(self, layer: int, first: torch.Tensor, second: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write entries for positions [start, start + T) of ``layer``; return the cache up to start + T
        in the compute dtype."""
        end = start + first.shape[0]
        if end > self._store[layer][0].shape[0]:
            self._grow(layer, end)
        store = self._store[layer]
        for i, t in enumerate((first, second)):
            if self._scales is None:
                store[i][start:end] = t
            else:
                store[i][start:end], self._scales[layer][i][start:end] = _to_fp8(t)
        return self.read(layer, end)

    def append_at(self, layer: int, first: torch.Tensor, second: torch.Tensor, position: torch.Tensor,
                  visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's entries at ``position`` (a one-element device tensor) and return entries [0, visible)
        in the compute dtype: fixed shapes and no host sync, for a decode step captured in a CUDA graph. The
        caller masks the entries past ``position``; the capacity must already cover it (fixed-capacity caches)."""
        self.write_at(layer, first, second, position)
        return self.read(layer, visible)

    def write_at(self, layer: int, first: torch.Tensor, second: torch.Tensor, position: torch.Tensor) -> None:
        """Write one token's entries at ``position`` (a one-element device tensor) in one launch, no host sync (a
        Triton kernel: CUDA tensors, or CPU tensors under the Triton interpreter)."""
        from ..kernels.kv_write import kv_write_at  # here: the CPU path never loads Triton

        scales = None if self._scales is None else tuple(self._scales[layer])
        kv_write_at(first.reshape(1, -1).contiguous(), second.reshape(1, -1).contiguous(), tuple(self._store[layer]),
                    scales, position)

    def storage(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A layer's raw storage (first [capacity, ...], second [capacity, ...], and their float32 per-token
        scales [capacity], None unless FP8), for kernels that read the cache in place."""
        scales = self._scales[layer] if self._scales is not None else (None, None)
        return self._store[layer][0], self._store[layer][1], scales[0], scales[1]

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries [0, end) of ``layer`` in the compute dtype."""
        store = self._store[layer]
        if self._scales is None:
            return store[0][:end].to(self.dtype), store[1][:end].to(self.dtype)
        out = []
        for i in range(2):
            view_shape = (end,) + (1,) * (store[i].dim() - 1)
            scale = self._scales[layer][i][:end].view(view_shape)
            out.append((store[i][:end].to(torch.float32) * scale).to(self.dtype))
        return out[0], out[1]

    def reset(self) -> None:
        """Empty the cache for a new sequence, keeping its memory (and so the addresses CUDA graphs captured)."""
        self.length = 0
        self._linear = [None] * len(self._linear)
        self._snapshot = None

    def linear_state(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A linear-attention layer's (conv state, recurrent state) at position ``length`` (None, None at 0)."""
        state = self._linear[layer]
        return (None, None) if state is None or self.length == 0 else state

    def set_linear_state(self, layer: int, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        self._linear[layer] = (conv, recurrent)

    def snapshot(self) -> None:
        """Remember the linear-attention states at the current length (LLM.stream takes one at the end of each
        prompt), so that a later :meth:`truncate` to this length or beyond can restore them."""
        if self.has_linear_state:
            self._snapshot = (self.length, [s if s is None else (s[0].clone(), s[1].clone()) for s in self._linear])

    def truncate(self, length: int) -> int:
        """Forget positions from ``length`` on (e.g. to reuse a shared prefix); returns the length actually kept.

        With linear-attention layers the kept length is ``length`` only when nothing is cut; otherwise it is the
        snapshot's length when that is at most ``length`` (its states are restored), else 0 (a full recompute).
        """
        length = min(self.length, length)
        if self.has_linear_state and length < self.length:
            if self._snapshot is not None and self._snapshot[0] <= length:
                length = self._snapshot[0]
                self._linear = [s if s is None else (s[0].clone(), s[1].clone()) for s in self._snapshot[1]]
            else:
                length = 0
        self.length = length
        return length
