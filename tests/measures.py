"""What the tests compare with: random prompts and error measures between logits."""

import numpy as np
import torch

RNG = np.random.default_rng()


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


def rand_f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    """Fresh standard-normal float32 values (times ``scale``), never zeros."""
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def rel_err_f64(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|, computed in float64 (for numpy results of the Rust kernels)."""
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())
