"""Top-k expert selection from router logits, for softmax and sigmoid scoring, plain or group-limited, and
DeepSeek-V3's "noaux_tc" selection (a correction bias that steers which experts are chosen, not their weights)."""

from __future__ import annotations

import torch

from ..models.spec import RouterSpec


def _group_scores(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor | None:
    """Each token's score of each expert group [T, n_group]; None when routing is not group-limited."""
    if not spec.group_limited or spec.n_group <= 1:
        return None
    t, e = choice.shape
    grouped = choice.view(t, spec.n_group, e // spec.n_group)
    if spec.group_score == "top2_sum":
        return grouped.topk(2, dim=-1).values.sum(dim=-1)
    return grouped.max(dim=-1).values


def _group_keep(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor | None:
    """Boolean [T, E]: True for experts in each token's best ``topk_group`` groups; None when not group-limited."""
    group_scores = _group_scores(choice, spec)
    if group_scores is None:
        return None
    t, e = choice.shape
    best_groups = group_scores.topk(spec.topk_group, dim=-1).indices
    keep = torch.zeros(t, spec.n_group, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, best_groups, True)
    return keep[:, :, None].expand(t, spec.n_group, e // spec.n_group).reshape(t, e)


def _scores(logits: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' scores [T, E] (float32; the weights are taken from these) and the scores they are chosen by
    (noaux_tc: the scores plus the correction bias; otherwise the same tensor)."""
    if spec.scoring == "softmax":
        scores = torch.softmax(logits.float(), dim=-1)
    else:
        scores = torch.sigmoid(logits.float())
    if not spec.correction_bias:
        return scores, scores
    if correction_bias is None:
        raise ValueError("this router adds a per-expert correction bias, but the layer has no 'router_bias' "
                         "tensor; the adapter must name mlp.gate.e_score_correction_bias")
    return scores, scores + correction_bias.to(scores.device, torch.float32)


def routing_margin(logits: torch.Tensor, spec: RouterSpec,
                   correction_bias: torch.Tensor | None = None) -> torch.Tensor:
    """How far each token's choice of experts is from a tie [T] (float32): the smallest gap between the last
    chosen and the first passed-over score, of the groups (group-limited routing) and of the experts. Two
    computations whose scores differ by well under this (a group's score sums two experts' under "top2_sum":
    under a quarter of it there) choose the same experts."""
    _, choice = _scores(logits, spec, correction_bias)
    margin = torch.full(choice.shape[:1], float("inf"), device=choice.device)
    group_scores = _group_scores(choice, spec)
    if group_scores is not None and spec.topk_group < spec.n_group:
        top = group_scores.topk(spec.topk_group + 1, dim=-1).values
        margin = top[:, -2] - top[:, -1]
        choice = choice.masked_fill(~_group_keep(choice, spec), float("-inf"))
    if spec.top_k < choice.shape[-1]:
        top = choice.topk(spec.top_k + 1, dim=-1).values
        margin = torch.minimum(margin, (top[:, -2] - top[:, -1]).nan_to_num(float("inf")))
    return margin


def route(logits: torch.Tensor, spec: RouterSpec, dtype: torch.dtype,
          correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (``dtype``) and expert ids [T, k] (int64) from router logits [T, E].

    ``correction_bias`` [E] is required when ``spec.correction_bias`` (the layer's "router_bias" tensor).
    """
    scores, choice = _scores(logits, spec, correction_bias)
    if spec.correction_bias:
        # noaux_tc: groups and experts are chosen by the biased scores; the weights are the unbiased ones
        keep = _group_keep(choice, spec)
        if keep is not None:
            choice = choice.masked_fill(~keep, float("-inf"))
        ids = torch.topk(choice, spec.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if spec.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        keep = _group_keep(scores, spec)
        if keep is not None:
            scores = scores.masked_fill(~keep, 0.0)
        weights, ids = torch.topk(scores, spec.top_k, dim=-1)
        if spec.norm_topk_prob and spec.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * spec.routed_scaling_factor
    return weights.to(dtype), ids
