"""The VRAM plan: how a budget is divided, and the error for a budget that cannot work."""

from dataclasses import replace

import pytest

from krasis.engine.vram_budget import MiB, VramNeeds, plan_vram
from krasis.errors import InvalidInputError

# DeepSeek-V2-Lite-like needs: 26 MoE layers of 64 INT4 experts (~4.6 MB each), 1.4 GiB resident
LITE = VramNeeds(resident=1400 * MiB, layer_experts=64 * 4_600_000, expert=4_600_000, moe_layers=26,
                 kv_per_token=15_700, activation_per_token=110_000, activation_per_context_token=18_000,
                 max_context=163840)


def total(plan) -> int:
    return (plan.resident + plan.margin + plan.stream_buffers + plan.kv_bytes + plan.activation_bytes + plan.hcs_bytes
            + plan.sequence_state)


def test_plan_stays_within_the_budget_and_fills_the_hot_cache_with_the_rest():
    plan = plan_vram(6144 * MiB, LITE)
    assert total(plan) <= plan.budget
    assert plan.budget - total(plan) < LITE.expert
    assert plan.hcs_slots > 0 and plan.chunk_tokens >= 2048


def test_a_larger_budget_buys_more_hot_experts():
    assert plan_vram(12288 * MiB, LITE).hcs_slots > plan_vram(6144 * MiB, LITE).hcs_slots


def test_hot_cache_never_exceeds_every_expert():
    plan = plan_vram(60000 * MiB, LITE)
    assert plan.hcs_slots == 26 * 64


def test_no_hcs_gives_the_hot_cache_nothing():
    assert plan_vram(6144 * MiB, LITE, hcs=False).hcs_slots == 0


def test_explicit_kv_cache_size_is_honoured():
    plan = plan_vram(6144 * MiB, LITE, kv_cache_bytes=100 * MiB)
    assert plan.kv_tokens == 100 * MiB // LITE.kv_per_token


def test_layer_group_size_sets_the_streaming_buffers():
    assert plan_vram(6144 * MiB, LITE, layer_group_size=2).stream_buffers == 4 * LITE.layer_experts


def test_impossible_budget_names_the_minimum():
    with pytest.raises(InvalidInputError, match=r"--vram-budget-mb to at least \d+"):
        plan_vram(1024 * MiB, LITE)


def test_kv_cache_larger_than_the_budget_is_refused_with_the_fix():
    with pytest.raises(InvalidInputError, match="--kv-cache-mb"):
        plan_vram(6144 * MiB, LITE, kv_cache_bytes=5000 * MiB)


def test_linear_attention_state_is_reserved_before_the_hot_cache():
    state = 200 * MiB
    with_state = plan_vram(6144 * MiB, replace(LITE, sequence_state=state))
    assert with_state.sequence_state == state
    assert total(with_state) <= with_state.budget
    assert with_state.hcs_bytes < plan_vram(6144 * MiB, LITE).hcs_bytes


def test_linear_state_bytes_equal_a_sequences_live_state_and_its_snapshot(tiny_checkpoint):
    import krasis
    from krasis.engine.kv_cache import linear_state_bytes

    llm = krasis.LLM(tiny_checkpoint("qwen3_next_mixed")[1], progress=False)
    cache = llm.new_cache()
    llm._prefill(llm._check_tokens(list(range(1, 20))), cache, 0)
    cache.snapshot()
    live = sum(c.nbytes + r.nbytes for state in cache._linear if state is not None for c, r in [state])
    assert live > 0
    assert linear_state_bytes(llm.spec, llm.dtype) == 2 * live
