"""device="cuda" runs the same forward on the GPU (GPU machine only)."""

import pytest
import torch

import krasis

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["qwen3_moe_mixed", "deepseek_v2_grouped_qlora"])
def test_cuda_float32_logits_match_cpu(tiny_checkpoint, name):
    path = tiny_checkpoint(name)[1]
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    cpu = krasis.LLM(path, device="cpu").prompt_logits(ids)
    gpu = krasis.LLM(path, device="cuda").prompt_logits(ids)
    assert float((gpu - cpu).abs().max() / cpu.abs().max()) < 1e-3


def test_cuda_greedy_generation_matches_cpu(tiny_checkpoint):
    path = tiny_checkpoint("deepseek_v2_lite_like")[1]
    ids = [5, 17, 99, 3]
    assert krasis.LLM(path, device="cuda").generate(ids, 12) == krasis.LLM(path).generate(ids, 12)
