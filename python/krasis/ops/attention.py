"""Causal attention over a KV cache: grouped-query attention and DeepSeek's multi-head latent attention.

Shapes: queries [T, H, D] for T new tokens whose first position is ``start``; cached keys/values hold
positions [0, start + T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def causal_mask(start: int | torch.Tensor, t: int, total: int, device: torch.device) -> torch.Tensor:
    """Boolean [t, total] mask, True where query start+i may attend to key j (j <= start+i). ``start`` may be
    a one-element device tensor (a decode step in a CUDA graph, where keys past it are unwritten slots)."""
    q_pos = (torch.arange(t, device=device) + start)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    return k_pos <= q_pos


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled dot-product attention; q [T, H, D], k [S, KV, D], v [S, KV, Dv] with H a multiple of KV
    -> [T, H, Dv]. Runs on [1, heads, tokens, dim] views so torch picks its fused (flash) kernels."""
    t, s = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    # A fresh sequence uses SDPA's own causal path (its fastest). A continuation (a later prefill chunk)
    # uses the lower-right-aligned causal bias, which the fused kernels take without materialising a
    # [T, S] mask; with grouped KV heads (which that bias does not take everywhere) the mask is explicit.
    fixed = isinstance(start, int)
    if fixed and start == 0 and s == t:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=t > 1, scale=scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
    elif fixed and k.shape[1] == q.shape[1] and s == start + t and t > 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(t, s), scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_mask(start, t, s, q.device), scale=scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Grouped-query attention; q [T, H, D], k/v [S, KV, D] -> [T, H, D]."""
    return sdpa(q, k, v, start, scale)


def mla_attention_expanded(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                           kv_b: torch.Tensor, v_head_dim: int, start: int, scale: float) -> torch.Tensor:
    """MLA by expanding the cached latents into per-head keys and values (cheapest for long query runs).

    q_nope [T, H, Dn], q_pe [T, H, Dr], latent [S, R], k_pe [S, Dr], kv_b [H*(Dn+Dv), R] -> [T, H, Dv].
    """
    t, h, dn = q_nope.shape
    kv = F.linear(latent, kv_b).view(latent.shape[0], h, dn + v_head_dim)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    k = torch.cat((k_nope, k_pe[:, None, :].expand(-1, h, -1)), dim=-1)
    q = torch.cat((q_nope, q_pe), dim=-1)
    return sdpa(q, k, v, start, scale)


def mla_attention_absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                           kv_b: torch.Tensor, v_head_dim: int, start: int | torch.Tensor,
                           scale: float) -> torch.Tensor:
    """MLA in the absorbed form: attention runs in the latent space, never expanding the cache
    (cheapest for decode). Same shapes as :func:`mla_attention_expanded`."""
    t, h, dn = q_nope.shape
    r = latent.shape[1]
    w = kv_b.view(h, dn + v_head_dim, r)
    w_uk, w_uv = w[:, :dn, :], w[:, dn:, :]
    q_lat = torch.einsum("thd,hdr->thr", q_nope, w_uk)
    scores = (torch.einsum("thr,sr->ths", q_lat, latent) + torch.einsum("thd,sd->ths", q_pe, k_pe)) * scale
    mask = causal_mask(start, t, latent.shape[0], latent.device)
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(latent.dtype)
    out_lat = torch.einsum("ths,sr->thr", probs, latent)
    return torch.einsum("thr,hvr->thv", out_lat, w_uv)
