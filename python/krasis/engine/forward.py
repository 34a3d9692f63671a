"""The decoder forward pass over new tokens of one sequence, reading and extending its KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models.spec import ArchSpec, GQASpec
from ..ops.attention import gqa_attention, mla_attention_absorbed, mla_attention_expanded
from ..ops.linear import linear
from ..ops.linear_attention import gated_deltanet
from ..ops.mlp import swiglu
from ..ops.norms import rms_norm
from ..ops.rope import Rotary
from ..ops.router import route
from .kv_cache import KVCache
from .weights import LayerWeights, ModelWeights

# Stores new cache entries (keys and values, or MLA latent and rope key) and returns all those to attend to.
KVAppend = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# MLA latent-norm epsilon: the reference builds these norms with the default epsilon, not rms_norm_eps.
MLA_NORM_EPS = 1e-6
# Below this many new tokens MLA attends in the latent space (decode); above, it expands K/V (prefill).
MLA_ABSORB_MAX_TOKENS = 16


class Forward:
    """Runs the layers of a model on new tokens of a sequence."""

    def __init__(self, spec: ArchSpec, weights: ModelWeights, dtype: torch.dtype, device: torch.device | str):
        self.spec, self.w, self.dtype, self.device = spec, weights, dtype, torch.device(device)
        self.rotary = Rotary(spec.rope, self.device)

    def __call__(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden], for tokens [T] at positions [start, start+T)."""
        cos, sin = self.rotary.angles(torch.arange(start, start + tokens.shape[0], device=self.device))
        if self.w.runtime is not None:
            self.w.runtime.begin_forward(tokens.shape[0])
        if cache.has_linear_state and start not in (0, cache.length):
            raise ValueError(f"linear-attention state is at position {cache.length}, not {start}: it cannot be "
                             "rewound; truncate the cache (KVCache.truncate) and continue from the length it keeps")
        x = self.w.embed[tokens.to(self.w.embed.device)].to(self.device)
        eps, offset = self.spec.rms_norm_eps, self.spec.norm_weight_offset
        for index, layer in enumerate(self.w.layers):
            h = rms_norm(x, layer.input_norm, eps, offset)
            if self.spec.layers[index].mixer == "linear_attention":
                x = x + self._linear_attention(index, layer, h, cache, start)
            else:
                def kv(first: torch.Tensor, second: torch.Tensor, index: int = index):
                    return cache.append(index, first, second, start)
                x = x + self.attention(layer, h, kv, start, cos, sin)
            h = rms_norm(x, layer.post_attention_norm, eps, offset)
            x = x + self._mlp(index, layer, h)
        cache.length = start + tokens.shape[0]
        return rms_norm(x, self.w.final_norm, eps, offset)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [T, vocab] in the compute dtype."""
        return linear(hidden, self.w.lm_head)

    def _linear_attention(self, index: int, layer: LayerWeights, h: torch.Tensor, cache: KVCache,
                          start: int) -> torch.Tensor:
        conv, recurrent = cache.linear_state(index) if start else (None, None)
        out, conv, recurrent = gated_deltanet(h, layer.attention, self.spec.linear_attention, self.spec.rms_norm_eps,
                                              conv, recurrent)
        cache.set_linear_state(index, conv, recurrent)
        return out

    def attention(self, layer: LayerWeights, h: torch.Tensor, kv: KVAppend, start: int | torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One attention block's output [T, hidden] for h [T, hidden] at positions [start, start+T).

        ``kv(first, second)`` stores the new tokens' cache entries and returns every cached entry the queries may
        see (those past the last position are masked). ``start`` is an int, or a one-element device tensor for a
        decode step replayed as a CUDA graph (no host value may be read then)."""
        a, w, t = self.spec.attention, layer.attention, h.shape[0]
        rd = self.spec.rope.dim
        if isinstance(a, GQASpec):
            q = linear(h, w["q"], w.get("q_bias"))
            gate = None
            if a.output_gate:  # per head [query (D) | gate (D)]
                q, gate = q.view(t, a.num_heads, 2 * a.head_dim).chunk(2, dim=-1)
                gate = gate.reshape(t, -1)
            q = q.reshape(t, a.num_heads, a.head_dim)
            k = linear(h, w["k"], w.get("k_bias")).view(t, a.num_kv_heads, a.head_dim)
            v = linear(h, w["v"], w.get("v_bias")).view(t, a.num_kv_heads, a.head_dim)
            if a.qk_norm:
                q = rms_norm(q, w["q_norm"], self.spec.rms_norm_eps, self.spec.norm_weight_offset)
                k = rms_norm(k, w["k_norm"], self.spec.rms_norm_eps, self.spec.norm_weight_offset)
            q = torch.cat((self.rotary.apply(q[..., :rd], cos, sin), q[..., rd:]), dim=-1)
            k = torch.cat((self.rotary.apply(k[..., :rd], cos, sin), k[..., rd:]), dim=-1)
            k_all, v_all = kv(k, v)
            out = gqa_attention(q, k_all, v_all, start, a.softmax_scale)
            if gate is not None:
                out = out.reshape(t, -1) * torch.sigmoid(gate)
        else:
            if "q" in w:
                q = linear(h, w["q"])
            else:
                q = linear(rms_norm(linear(h, w["q_a"], w.get("q_a_bias")), w["q_a_norm"], MLA_NORM_EPS), w["q_b"])
            q = q.view(t, a.num_heads, a.qk_nope_head_dim + a.qk_rope_head_dim)
            q_nope, q_pe = q[..., : a.qk_nope_head_dim], q[..., a.qk_nope_head_dim:]
            ckv = linear(h, w["kv_a"], w.get("kv_a_bias"))
            latent = rms_norm(ckv[:, : a.kv_lora_rank], w["kv_a_norm"], MLA_NORM_EPS)
            k_pe = self.rotary.apply(ckv[:, None, a.kv_lora_rank:], cos, sin)[:, 0]
            q_pe = self.rotary.apply(q_pe, cos, sin)
            lat_all, kpe_all = kv(latent, k_pe)
            attend = mla_attention_absorbed if t <= MLA_ABSORB_MAX_TOKENS else mla_attention_expanded
            out = attend(q_nope, q_pe, lat_all, kpe_all, w["kv_b"], a.v_head_dim, start, a.softmax_scale)
        return linear(out.reshape(t, -1), w["o"], w.get("o_bias"))

    def _mlp(self, index: int, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        if layer.experts is None:
            m = layer.mlp
            return swiglu(h, m["gate"], m["up"], m["down"])
        weights, ids = self.route(layer, h)
        # the shared expert is enqueued first so that on the GPU it overlaps the CPU's routed experts
        shared = self.shared_expert(layer, h)
        out = layer.experts.forward(h, weights, ids)
        return out if shared is None else out + shared

    def route(self, layer: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An MoE layer's routing weights [T, k] and expert ids [T, k] for h [T, hidden]."""
        m, router = layer.mlp, self.spec.moe.router
        if router.float32_logits:
            return route(F.linear(h.float(), m["router"].float()), router, torch.float32, m.get("router_bias"))
        return route(F.linear(h, m["router"]), router, h.dtype, m.get("router_bias"))

    def shared_expert(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor | None:
        """An MoE layer's shared-expert output [T, hidden] (gated where the model gates it), None without one."""
        m = layer.mlp
        if "shared_gate" not in m:
            return None
        shared = swiglu(h, m["shared_gate"], m["shared_up"], m["shared_down"])
        if "shared_expert_gate" in m:
            shared = torch.sigmoid(linear(h, m["shared_expert_gate"])) * shared
        return shared
