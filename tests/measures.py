"""What the tests compare with: random prompts and error measures between logits."""

import torch


def random_prompt(n: int, seed: int, high: int = 300) -> list[int]:
    """n token ids below ``high``, fresh for each seed."""
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def rms_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS(a - b) / RMS(b)."""
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def argmax_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows whose argmax agrees."""
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())
