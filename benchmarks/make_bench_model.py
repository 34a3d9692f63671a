"""Write the standard bench model: a random-weight Hugging Face checkpoint with DeepSeek-V2-Lite's exact
dimensions (15.7 B parameters, ~31 GB in BF16), plus Krasis' byte-level tokenizer with a chat template.

    python benchmarks/make_bench_model.py /tmp/dsv2                   # full size, built on the GPU when there is one
    python benchmarks/make_bench_model.py /tmp/dsv2-tiny --tiny       # small stand-in for checking the pipeline on CPU
    python benchmarks/make_bench_model.py /tmp/dsv2-4l --layers 4 --device cpu   # full dims, fewer layers
    python benchmarks/make_bench_model.py /tmp/dsv2-skew1 --routing-skew 1   # Zipf-like expert popularity

The model is built by transformers' own DeepseekV2ForCausalLM from a DeepseekV2Config (so tensor names and
shapes are the real ones), initialised by transformers (normal(0, initializer_range=0.02), norms one), in BF16
directly on the device, and written with save_pretrained (safetensors shards of at most 5 GB). The config uses
``rope_parameters``, which transformers 5.17 and 5.23 both accept.

After writing, two checks run on the in-memory model and are printed (and saved in OUTDIR/bench_model.json,
which is written last: its presence means the checkpoint is complete):
- routing spread: over 512 random tokens, the share of routed experts that layer 1 (the first MoE layer) uses
  and the max / mean expert load (1.0 = perfectly even), plus the worst layer;
- routing skew (same pass): the share of routed calls that the most popular 25% of experts serve (per layer, and
  averaged over the MoE layers), next to the target that --routing-skew fitted. 25% would be perfectly even; one
  random prompt has routing preferences of its own, so S = 0 shows about 40% on 512 tokens (full size; 35% on 4096);
- stability: a forward pass over a long random prompt (--check-tokens) in BF16, the RMS of the hidden state
  after every decoder layer and whether everything (hidden states, last logits) is finite.

--routing-skew S (default 0) makes a few experts popular, as in trained models (random weights route almost
evenly, which hides what a hot-expert cache gains). Expert e of a MoE layer gets popularity p_e proportional to
1 / (rank_e + 1)^S, the ranks a random permutation per layer (from --seed): over many prompts, each expert's share
of the routed calls is what drawing a token's top-k experts without replacement with probabilities p would give
(Plackett-Luce). At S = 1 with 64 experts and top-6 the most popular 16 then serve 66% of the calls over many
prompts, and about 75% of one 512-token prompt's (measured at full size; S = 0.5: 44% / 60%, S = 2: 90% / 93%).
The router has no bias parameter, so the bias is built from the architecture itself, the way trained models use
their massive-activation channels: hidden channel c = hidden_size - 1 is a constant "bias channel".
- The embedding's column c is SKEW_CHANNEL_VALUE for every token, and row c of every matrix that writes into the
  residual stream (attention o_proj, the dense MLP's down_proj, the shared and every routed expert's down_proj) is
  zero, so residual channel c is exactly that constant after every layer (checked during the fit).
- The post-attention RMSNorm turns it into a positive router input (value / hidden RMS), so the router weight's
  column c is a per-expert bias. It is fitted layer by layer, in one forward pass over --skew-tokens random tokens
  in sequences of 128 (the decode benchmark's prompt length), until each expert's share of the routed calls
  matches its Plackett-Luce share; it starts from S * log p_e times the Gumbel scale of the router's own logit
  noise. Longer contexts come out somewhat more skewed (one 4096-token prompt: 81% at S = 1).
S = 0 changes nothing: the weights are the same, bit for bit, as without the flag. OUTDIR/bench_model.json records
``routing_skew`` (and, for S > 0, ``skew``: the channel, its value, the target share and what the fit reached).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

# DeepSeek-V2-Lite's public config.json values (deepseek-ai/DeepSeek-V2-Lite).
DSV2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
    num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
    v_head_dim=128, qk_nope_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
    topk_method="greedy", n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=False,
    routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=163840, tie_word_embeddings=False,
    initializer_range=0.02, hidden_act="silu", attention_bias=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 0.707, "mscale_all_dim": 0.707},
)

# A small stand-in with the same structure (dense first layer, MLA without q LoRA, YaRN, 2 shared experts); every
# matrix's input dimension is a multiple of 64 (the CPU kernels need it).
TINY = dict(DSV2_LITE, vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, qk_rope_head_dim=64,
            qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2)


def bench_config(tiny: bool = False, layers: int | None = None, specials: dict[str, int] | None = None):
    """The DeepseekV2Config of the bench model (or of the tiny stand-in). ``specials``: the tokenizer's special
    token ids (``krasis.synthetic.write_tokenizer``'s answer); EOS is <|im_end|>, PAD <|endoftext|>, no BOS,
    matching the tokenizer_config.json it writes."""
    from transformers import DeepseekV2Config

    kw = dict(TINY if tiny else DSV2_LITE)
    kw["rope_parameters"] = dict(kw["rope_parameters"])  # the config mutates it
    if layers is not None:
        kw["num_hidden_layers"] = layers
    if specials is not None:
        kw.update(eos_token_id=specials["<|im_end|>"], pad_token_id=specials["<|endoftext|>"], bos_token_id=None)
    return DeepseekV2Config(**kw)


def build_model(config, device: str, seed: int = 0):
    """DeepseekV2ForCausalLM with transformers' random init, created in BF16 directly on ``device``."""
    from transformers import DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = DeepseekV2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _random_tokens(n: int, vocab: int, device, seed: int) -> torch.Tensor:
    """Random ids below the tokenizer's special tokens (which sit at the top ids)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 8, (1, n), generator=gen).to(device)


def moe_layers(model) -> list[tuple[int, torch.nn.Module]]:
    """(index, decoder layer) of every MoE layer (its MLP has a router ``gate``; a dense MLP has gate_proj)."""
    cfg = model.config
    out = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "weight") and gate.weight.shape[0] == cfg.n_routed_experts:
            out.append((i, layer))
    return out


def top_quarter_share(load: torch.Tensor) -> float:
    """Share of all routed calls that the most popular quarter of the experts serve (``load``: calls per expert)."""
    q = max(1, load.numel() // 4)
    return float(load.float().sort(descending=True).values[:q].sum() / load.float().sum())


def zipf_popularity(n_experts: int, skew: float) -> torch.Tensor:
    """p_r proportional to 1 / (r + 1)^skew for ranks r = 0 .. n_experts - 1 (float64, sums to one)."""
    p = (torch.arange(n_experts, dtype=torch.float64) + 1).pow(-float(skew))
    return p / p.sum()


def plackett_luce_shares(p: torch.Tensor, top_k: int, samples: int = 1 << 17, seed: int = 0) -> torch.Tensor:
    """Each entry's expected share of the picks when every token draws ``top_k`` distinct entries without replacement
    with probabilities ``p`` (Plackett-Luce), by Monte Carlo with the Gumbel-top-k trick; sums to one."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(samples, p.numel(), generator=gen, dtype=torch.float64).clamp_min(1e-300)
    idx = (p.log() - (-u.log()).log()).topk(top_k, dim=1).indices
    return torch.bincount(idx.reshape(-1), minlength=p.numel()).double() / idx.numel()


# Residual value of the bias channel: 5x the embeddings' std (so it barely moves layer 0's RMSNorm), a router
# input of 0.03-0.1 after the RMSNorms of the full-size model (hidden RMS 1-3), about 2 in the tiny one.
SKEW_CHANNEL_VALUE = 0.1


def _residual_writers(layer, channel: int) -> list[torch.Tensor]:
    """The parts of one decoder layer's weights that write residual channel ``channel``: row ``channel`` of attention
    o_proj and of the dense MLP's / shared experts' down_proj (and their biases, if any), and of every routed expert's
    down_proj ([experts, hidden, intermediate] in transformers 5)."""
    linears = [layer.self_attn.o_proj]
    mlp = layer.mlp
    if hasattr(mlp, "experts"):
        linears.append(mlp.shared_experts.down_proj)
        down = mlp.experts.down_proj
        parts = [down[:, channel, :]]
    else:
        linears.append(mlp.down_proj)
        parts = []
    for lin in linears:
        parts.append(lin.weight[channel])
        if lin.bias is not None:
            parts.append(lin.bias[channel : channel + 1])
    return parts


def _fit_bias_column(l0: torch.Tensor, xc: torch.Tensor, target: torch.Tensor, top_k: int, w: torch.Tensor,
                     steps: int = 400) -> torch.Tensor:
    """Router column ``w`` [experts] such that top-k of ``l0 + xc * w`` ([tokens, experts]: logits without the bias
    channel, plus the bias channel's input times ``w``) picks each expert with share ``target``."""
    n_tok, n_exp = l0.shape
    floor = 0.5 / (n_tok * top_k)
    unit = float(l0.std(dim=1).mean()) / float(xc.mean())  # one logit-noise std, in units of the router weight
    log_target = target.clamp_min(floor).log()
    for step in range(steps):
        idx = (l0 + xc[:, None] * w[None, :]).topk(top_k, dim=1).indices
        share = torch.bincount(idx.reshape(-1), minlength=n_exp).float() / idx.numel()
        w = w + (0.5 * (1 - step / steps) + 0.02) * unit * (log_target - share.clamp_min(floor).log())
    return w


@torch.no_grad()
def apply_routing_skew(model, skew: float, seed: int = 0, n_tokens: int = 2048, seq_len: int = 128,
                       token_seed: int = 3) -> dict:
    """Give the experts of every MoE layer Zipf-like popularity (see the module docstring): make hidden channel
    hidden_size - 1 a constant bias channel and fit each router's weight column for it, layer by layer, in one
    forward pass over ``n_tokens`` random tokens in sequences of ``seq_len`` (many sequences, so that the fit does
    not learn one sequence's own routing preferences). ``skew`` = 0 changes nothing. Returns what was done."""
    if skew < 0:
        raise ValueError(f"routing skew must be >= 0, got {skew}")
    if skew == 0:
        return {"routing_skew": 0.0}
    cfg = model.config
    c = cfg.hidden_size - 1
    n_exp, top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
    emb = model.model.embed_tokens.weight
    emb[:, c] = SKEW_CHANNEL_VALUE
    value = float(emb[0, c])  # as stored (bf16)
    for layer in model.model.layers:
        for part in _residual_writers(layer, c):
            part.zero_()

    p = zipf_popularity(n_exp, skew)
    target_by_rank = plackett_luce_shares(p, top_k, seed=seed).float()
    gen = torch.Generator().manual_seed(seed + 12345)
    fitted: dict[int, dict] = {}
    hooks = []

    def fit(i, gate, inputs):
        x = inputs[0].reshape(-1, cfg.hidden_size).float()
        w = gate.weight.float()
        xc = x[:, c]
        if not bool((xc > 0).all()):
            raise RuntimeError(f"layer {i}: the router's bias-channel input is not positive everywhere")
        l0 = x @ w.T - xc[:, None] * w[None, :, c]  # the router's logits without the bias channel
        order = torch.randperm(n_exp, generator=gen)  # order[r] is the expert of rank r
        target = torch.empty(n_exp)
        target[order] = target_by_rank
        rank = torch.empty(n_exp, dtype=torch.long)
        rank[order] = torch.arange(n_exp)
        beta = float(l0.std(dim=1).mean()) * 6**0.5 / torch.pi  # Gumbel scale matching the logit noise's std
        w0 = (skew * beta * p.log()[rank].float() / float(xc.mean())).to(l0.device)
        col = _fit_bias_column(l0, xc, target.to(l0.device), top_k, w0)
        gate.weight[:, c] = col.to(gate.weight.dtype)
        popular = order[: max(1, n_exp // 4)]

        def popular_share(col):
            idx = (l0 + xc[:, None] * col[None, :].float()).topk(top_k, dim=1).indices.reshape(-1).cpu()
            return float(torch.isin(idx, popular).float().mean())

        fitted[i] = {"popular_experts": popular.tolist(), "bias_input_mean": float(xc.mean()),
                     "logit_noise_std": float(l0.std(dim=1).mean()), "start_top_quarter_share": popular_share(w0),
                     "fitted_top_quarter_share": popular_share(gate.weight[:, c])}

    def check(i, _mod, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        if not bool((h[..., c] == value).all()):
            raise RuntimeError(f"layer {i}: residual channel {c} is no longer constant")

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: check(i, m, a, o)))
    for i, layer in moe_layers(model):
        hooks.append(layer.mlp.gate.register_forward_pre_hook(lambda m, a, i=i: fit(i, m, a)))
    try:
        n_seq = max(1, n_tokens // seq_len)
        ids = _random_tokens(n_seq * seq_len, cfg.vocab_size, model.device, token_seed).reshape(n_seq, seq_len)
        model(ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return {"routing_skew": float(skew), "channel": c, "channel_value": value, "fit_sequences": n_seq,
            "fit_seq_len": seq_len,
            "target_top_quarter_share": top_quarter_share(target_by_rank), "layers": fitted}


@torch.inference_mode()
def routing_spread(model, n_tokens: int = 512, seed: int = 1) -> dict:
    """Per MoE layer, over ``n_tokens`` random tokens: experts used (share of all), max/mean load, and the share of
    the routed calls that the most popular quarter of the experts serve (also averaged over the MoE layers)."""
    cfg = model.config
    picks: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in moe_layers(model):
        gate = layer.mlp.gate

        def hook(_mod, _inp, out, i=i):
            # The router returns (logits, top-k weights, top-k indices) in transformers 5.17 and 5.23.
            idx = [t for t in (out if isinstance(out, tuple) else (out,))
                   if torch.is_tensor(t) and not t.is_floating_point()]
            picks[i] = idx[-1].reshape(-1).cpu()
        hooks.append(gate.register_forward_hook(hook))
    try:
        model(_random_tokens(n_tokens, cfg.vocab_size, model.device, seed), use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    layers = {}
    for i, ids in picks.items():
        load = torch.bincount(ids, minlength=cfg.n_routed_experts).float()
        layers[i] = {"experts_used": int((load > 0).sum()), "share_used": float((load > 0).float().mean()),
                     "max_over_mean_load": float(load.max() / load.mean()),
                     "top_quarter_share": top_quarter_share(load)}
    mean_top = sum(x["top_quarter_share"] for x in layers.values()) / max(1, len(layers))
    return {"tokens": n_tokens, "experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok,
            "top_quarter_share": mean_top, "layers": layers}


@torch.inference_mode()
def stability(model, n_tokens: int, seed: int = 2) -> dict:
    """Hidden-state RMS after every decoder layer over a random ``n_tokens`` prompt, and finiteness."""
    rms: dict[int, float] = {}
    finite: dict[int, bool] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(_mod, _inp, out, i=i):
            h = out[0] if isinstance(out, tuple) else out
            hf = h.float()
            rms[i] = float(hf.pow(2).mean().sqrt())
            finite[i] = bool(torch.isfinite(hf).all())
        hooks.append(layer.register_forward_hook(hook))
    try:
        ids = _random_tokens(n_tokens, model.config.vocab_size, model.device, seed)
        logits = model(ids, use_cache=False, logits_to_keep=1).logits
    finally:
        for h in hooks:
            h.remove()
    lf = logits.float()
    return {"tokens": n_tokens, "layer_rms": [rms[i] for i in sorted(rms)],
            "all_finite": all(finite.values()) and bool(torch.isfinite(lf).all()),
            "last_logits_std": float(lf.std()), "last_logits_absmax": float(lf.abs().max())}


def write(out: Path, tiny: bool, layers: int | None, device: str, seed: int, skew: float = 0.0,
          skew_tokens: int = 2048) -> dict:
    from krasis.synthetic import write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model.json").unlink(missing_ok=True)
    vocab = (TINY if tiny else DSV2_LITE)["vocab_size"]
    specials = write_tokenizer(out, vocab)
    config = bench_config(tiny, layers, specials)
    t0 = time.perf_counter()
    model = build_model(config, device, seed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {n_params / 1e6:,.1f} M parameters ({config.num_hidden_layers} layers) on {device} "
          f"in {build_s:.1f} s", flush=True)
    skew_info = None
    if skew > 0:
        t0 = time.perf_counter()
        skew_info = apply_routing_skew(model, skew, seed, skew_tokens)
        print(f"routing skew {skew:g}: channel {skew_info['channel']} = {skew_info['channel_value']:g}, router bias "
              f"column fitted over {skew_info['fit_sequences']} x {skew_info['fit_seq_len']} random tokens in "
              f"{time.perf_counter() - t0:.1f} s (target: top 25% of experts serve "
              f"{skew_info['target_top_quarter_share']:.0%} of routed calls)", flush=True)
    t0 = time.perf_counter()
    model.save_pretrained(out, max_shard_size="5GB")
    save_s = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {written / 1e9:.2f} GB of safetensors in {save_s:.1f} s ({written / 1e9 / save_s:.2f} GB/s) "
          f"to {out}", flush=True)
    saved = json.loads((out / "config.json").read_text())
    assert saved.get("eos_token_id") == specials["<|im_end|>"], "config EOS id does not match the tokenizer"
    r = {"model": model, "params": n_params, "bytes": written, "build_s": build_s, "save_s": save_s,
         "layers": config.num_hidden_layers, "device": device, "routing_skew": float(skew)}
    if skew_info is not None:
        r["skew"] = skew_info
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path)
    p.add_argument("--tiny", action="store_true", help="small stand-in (3 layers, hidden 256, 8 experts, vocab 512)")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: 27; tiny: 3)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="where to build the weights (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routing-skew", type=float, default=0.0, metavar="S",
                   help="Zipf exponent of expert popularity, p ~ 1/(rank+1)^S (default 0: the random model's own "
                        "near-even routing, weights unchanged; 1: the top 25%% of experts serve most calls)")
    p.add_argument("--skew-tokens", type=int, default=2048,
                   help="random tokens (in sequences of 128) over which the router bias of --routing-skew is fitted")
    p.add_argument("--route-tokens", type=int, default=512, help="random tokens for the routing-spread check")
    p.add_argument("--check-tokens", type=int, default=None,
                   help="prompt length of the stability check (default 4096 on cuda, 1024 on cpu; 0 skips "
                        "both checks)")
    p.add_argument("--force", action="store_true", help="overwrite OUTDIR if it holds a checkpoint already")
    args = p.parse_args()
    if args.routing_skew < 0:
        p.error("--routing-skew must be >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if (args.outdir / "config.json").exists():
        if not args.force:
            p.error(f"{args.outdir} already holds a checkpoint; pass --force to overwrite it")
        shutil.rmtree(args.outdir)
    t_all = time.perf_counter()
    r = write(args.outdir, args.tiny, args.layers, device, args.seed, args.routing_skew, args.skew_tokens)
    model = r.pop("model")
    check_tokens = args.check_tokens if args.check_tokens is not None else (4096 if device == "cuda" else 1024)
    report = {**r, "outdir": str(args.outdir), "tiny": args.tiny}
    if check_tokens > 0:
        t0 = time.perf_counter()
        spread = routing_spread(model, args.route_tokens)
        stab = stability(model, check_tokens)
        report.update(routing=spread, stability=stab, check_s=time.perf_counter() - t0)
        first = min(spread["layers"])
        l1 = spread["layers"][first]
        worst = min(spread["layers"].values(), key=lambda x: x["share_used"])
        worst_load = max(x["max_over_mean_load"] for x in spread["layers"].values())
        print(f"stability ({check_tokens} random tokens, bf16): hidden RMS by layer "
              + " ".join(f"{x:.2f}" for x in stab["layer_rms"])
              + f"; finite: {stab['all_finite']}; last-token logits std {stab['last_logits_std']:.2f}")
        print(f"routing spread ({spread['tokens']} random tokens, top-{spread['top_k']} of {spread['experts']}): "
              f"layer {first} uses {l1['experts_used']}/{spread['experts']} experts ({l1['share_used']:.0%}), "
              f"max/mean load {l1['max_over_mean_load']:.2f}; worst layer uses {worst['share_used']:.0%}, "
              f"worst max/mean load {worst_load:.2f}")
        target = r.get("skew", {}).get("target_top_quarter_share")
        print(f"routing skew {args.routing_skew:g}: the top 25% of experts serve {spread['top_quarter_share']:.1%} of "
              f"routed calls (mean over {len(spread['layers'])} MoE layers; per layer "
              + " ".join(f"{x['top_quarter_share']:.0%}" for x in spread["layers"].values())
              + (f"; target {target:.1%}" if target is not None else "") + ")")
        if not stab["all_finite"]:
            print("ERROR: the random model produced NaN/inf in bf16", file=sys.stderr)
            sys.exit(1)
    del model
    report["total_s"] = time.perf_counter() - t_all
    (args.outdir / "bench_model.json").write_text(json.dumps(report, indent=1))
    print(f"done in {report['total_s']:.1f} s: {args.outdir} ({r['bytes'] / 1e9:.2f} GB, "
          f"{r['params'] / 1e6:,.1f} M params, {len(list(args.outdir.glob('*.safetensors')))} shard(s) of <= 5 GB)")


if __name__ == "__main__":
    main()
