"""Choosing the next token from logits: greedy, or temperature with top-k / top-p / min-p, after optional
presence and frequency penalties."""

from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence_penalty: float,
                    frequency_penalty: float) -> torch.Tensor:
    """OpenAI's penalties: logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0), where
    count[t] is how often token t was generated so far."""
    return (logits.float() - frequency_penalty * counts
            - presence_penalty * (counts > 0).to(torch.float32))


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generator: torch.Generator | None, min_p: float = 0.0, presence_penalty: float = 0.0,
           frequency_penalty: float = 0.0, counts: torch.Tensor | None = None) -> int:
    """Next token id from logits [vocab]. temperature 0 is greedy (argmax). ``counts`` (float [vocab], how often
    each token was generated so far) is needed for the penalties; min_p drops tokens whose probability is below
    min_p times the most likely token's."""
    if counts is not None and (presence_penalty or frequency_penalty):
        logits = apply_penalties(logits, counts, presence_penalty, frequency_penalty)
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    if top_p < 1.0:
        probs = probs / probs.sum()
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the first token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
