"""--routing-skew of benchmarks/make_bench_model.py, on the --tiny bench model (CPU, a few seconds)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import make_bench_model as mb  # noqa: E402


def _tiny(skew: float = 0.0):
    model = mb.build_model(mb.bench_config(tiny=True), "cpu", seed=0)
    info = mb.apply_routing_skew(model, skew, seed=0, n_tokens=1024)
    return model, info


@pytest.fixture(scope="module")
def plain():
    return _tiny(0.0)[0]


@pytest.fixture(scope="module")
def skewed():
    return _tiny(1.0)


def _mean_top_quarter(model) -> float:
    # Several independent prompts: one random prompt has routing preferences of its own on the tiny model.
    return sum(mb.routing_spread(model, 512, seed)["top_quarter_share"] for seed in (1, 4, 5, 6)) / 4


def test_skew_one_makes_the_top_quarter_of_experts_serve_clearly_more_calls(plain, skewed):
    model, info = skewed
    flat, skew = _mean_top_quarter(plain), _mean_top_quarter(model)
    assert 0.25 <= flat < 0.5
    assert skew > flat + 0.1
    assert info["target_top_quarter_share"] == pytest.approx(0.506, abs=0.02)  # 8 experts, top-2, Zipf 1
    for layer in info["layers"].values():  # the fit hits the target on its own tokens
        assert layer["fitted_top_quarter_share"] == pytest.approx(info["target_top_quarter_share"], abs=0.04)
    # the experts made popular are the ones that get the calls
    picks = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _a, out, i=i: picks.__setitem__(i, out[2].reshape(-1)))
             for i, layer in mb.moe_layers(model)]
    try:
        with torch.inference_mode():
            model(mb._random_tokens(2048, model.config.vocab_size, "cpu", 9).reshape(16, 128), use_cache=False,
                  logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    for i, ids in picks.items():
        popular = torch.tensor(info["layers"][i]["popular_experts"])
        assert float(torch.isin(ids, popular).float().mean()) > 0.4


def test_report_has_the_top_quarter_share(plain):
    spread = mb.routing_spread(plain, 128)
    assert set(spread["layers"]) == {1, 2}
    shares = [x["top_quarter_share"] for x in spread["layers"].values()]
    assert all(0.25 <= s <= 1 for s in shares)
    assert spread["top_quarter_share"] == pytest.approx(sum(shares) / len(shares))
    assert mb.top_quarter_share(torch.tensor([1, 1, 1, 1, 1, 1, 1, 9])) == pytest.approx(10 / 16)


def test_bias_channel_stays_constant_through_every_layer(skewed):
    model, info = skewed
    c = info["channel"]
    assert c == model.config.hidden_size - 1
    ids = mb._random_tokens(64, model.config.vocab_size, "cpu", 11)
    with torch.inference_mode():
        out = model(ids, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states  # the embeddings, then after every decoder layer but the last, then the final norm
    assert len(hidden) == model.config.num_hidden_layers + 1
    for h in hidden[:-1]:
        assert torch.equal(h[..., c], torch.full_like(h[..., c], mb.SKEW_CHANNEL_VALUE))
    # the last layer's own output, before the final norm
    last = {}
    hook = model.model.layers[-1].register_forward_hook(lambda _m, _a, o: last.__setitem__("h", o))
    try:
        with torch.inference_mode():
            model(ids, use_cache=False)
    finally:
        hook.remove()
    h = last["h"][0] if isinstance(last["h"], tuple) else last["h"]
    assert torch.equal(h[..., c], torch.full_like(h[..., c], info["channel_value"]))
    stab = mb.stability(model, 256)
    assert stab["all_finite"] and all(0.01 < r < 1 for r in stab["layer_rms"])


def test_skew_zero_leaves_the_model_as_before(plain):
    fresh = mb.build_model(mb.bench_config(tiny=True), "cpu", seed=0)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert mb.apply_routing_skew(fresh, 0.0) == {"routing_skew": 0.0}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert torch.equal(v, plain.state_dict()[k]), k
    with pytest.raises(ValueError):
        mb.apply_routing_skew(fresh, -1.0)
