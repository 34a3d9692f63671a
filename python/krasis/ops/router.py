"""Top-k expert selection from router logits, for softmax and sigmoid scoring, plain or group-limited."""

from __future__ import annotations

import torch

from ..models.spec import RouterSpec


def route(logits: torch.Tensor, spec: RouterSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (``dtype``) and expert ids [T, k] (int64) from router logits [T, E]."""
    if spec.scoring == "softmax":
        scores = torch.softmax(logits.float(), dim=-1)
    else:
        scores = torch.sigmoid(logits.float())
    if spec.group_limited and spec.n_group > 1:
        t, e = scores.shape
        grouped = scores.view(t, spec.n_group, e // spec.n_group)
        best_groups = grouped.max(dim=-1).values.topk(spec.topk_group, dim=-1).indices
        keep = torch.zeros(t, spec.n_group, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, best_groups, True)
        scores = scores.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(t, e), 0.0)
    weights, ids = torch.topk(scores, spec.top_k, dim=-1)
    if spec.norm_topk_prob and spec.top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * spec.routed_scaling_factor
    return weights.to(dtype), ids
