"""Sampling settings behave as documented."""

import torch

import krasis
from krasis.engine.sampling import sample


def test_temperature_zero_is_argmax():
    logits = torch.randn(50)
    assert sample(logits, 0.0, 1.0, 0, None) == int(logits.argmax())


def test_top_k_one_is_argmax_at_any_temperature():
    logits = torch.randn(50)
    g = torch.Generator().manual_seed(0)
    assert all(sample(logits, 2.0, 1.0, 1, g) == int(logits.argmax()) for _ in range(20))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.1]))
    g = torch.Generator().manual_seed(0)
    seen = {sample(logits, 1.0, 0.7, 0, g) for _ in range(200)}
    assert seen == {0, 1}


def test_same_seed_same_tokens(tiny_checkpoint):
    llm = krasis.LLM(tiny_checkpoint("qwen3_moe_mixed")[1])
    a = llm.generate([5, 6, 7], max_new_tokens=8, temperature=1.5, seed=42)
    b = llm.generate([5, 6, 7], max_new_tokens=8, temperature=1.5, seed=42)
    c = llm.generate([5, 6, 7], max_new_tokens=8, temperature=1.5, seed=43)
    assert a == b and a != c


def test_generation_stops_after_eos(tiny_checkpoint):
    llm = krasis.LLM(tiny_checkpoint("qwen3_moe_mixed")[1])
    llm.eos_token_ids = set()
    free = llm.generate([5, 6, 7], max_new_tokens=8)
    stop_at = max(i for i, t in enumerate(free) if t not in free[:i])
    llm.eos_token_ids = {free[stop_at]}
    assert llm.generate([5, 6, 7], max_new_tokens=8) == free[: stop_at + 1]


def test_prefix_reuse_prefills_only_new_tokens_and_gives_the_same_tokens(tiny_checkpoint):
    llm = krasis.LLM(tiny_checkpoint("deepseek_v2_lite_like")[1])
    turn1 = [5, 6, 7, 8, 9, 10]
    answer = llm.generate(turn1, max_new_tokens=5)
    list(llm.stream(turn1, max_new_tokens=5, reuse_prefix=True))
    assert llm.last_cached_tokens == 0
    turn2 = turn1 + answer + [11, 12]
    fresh = llm.generate(turn2, max_new_tokens=6)
    reused = list(llm.stream(turn2, max_new_tokens=6, reuse_prefix=True))
    assert llm.last_cached_tokens == len(turn1) + len(answer) - 1  # the last answer token was never fed back
    assert reused == fresh
    # a conversation that diverges early reuses only the common part
    diverged = list(llm.stream([5, 6, 99, 98], max_new_tokens=3, reuse_prefix=True))
    assert llm.last_cached_tokens == 2
    assert diverged == llm.generate([5, 6, 99, 98], 3)


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {sample(logits, 1.0, 1.0, 0, g, min_p=0.5) for _ in range(300)}
    assert seen == {0, 1}  # 0.15 and 0.05 are below 0.5 * 0.5


def test_frequency_penalty_lowers_a_logit_by_its_count():
    logits = torch.tensor([3.0, 2.5, 0.0])
    counts = torch.tensor([2.0, 0.0, 0.0])
    assert sample(logits, 0.0, 1.0, 0, None, counts=counts) == 0  # penalties off by default
    assert sample(logits, 0.0, 1.0, 0, None, frequency_penalty=0.3, counts=counts) == 1  # 3.0 - 0.6 < 2.5


def test_presence_penalty_lowers_every_seen_token_once():
    logits = torch.tensor([3.0, 2.5, 0.0])
    counts = torch.tensor([5.0, 0.0, 0.0])
    assert sample(logits, 0.0, 1.0, 0, None, presence_penalty=0.4, counts=counts) == 0  # 2.6 > 2.5
    assert sample(logits, 0.0, 1.0, 0, None, presence_penalty=0.6, counts=counts) == 1


def test_stream_with_a_strong_frequency_penalty_never_repeats_a_token(tiny_checkpoint):
    llm = krasis.LLM(tiny_checkpoint("qwen3_moe_mixed")[1])
    llm.eos_token_ids = set()
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    plain = llm.generate(ids, max_new_tokens=12)
    penalised = list(llm.stream(ids, max_new_tokens=12, frequency_penalty=2.0, presence_penalty=100.0))
    assert len(set(plain)) < len(plain)  # greedy repeats itself on this random model
    assert len(set(penalised)) == len(penalised)
