"""Writing random-weight checkpoints of real architectures in Hugging Face format (config.json, safetensors,
a byte-level tokenizer with a chat template). Used for the demo model, the tests and the benchmarks; no
transformers needed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .models import spec_from_config
from .models.shapes import checkpoint_tensors

# A Qwen3-style ChatML template written for Krasis: system/user/assistant/tool turns, optional thinking.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def write_tokenizer(out_dir: Path, vocab_size: int, chat_template: str = CHATML_TEMPLATE) -> dict[str, int]:
    """A byte-level BPE tokenizer covering exactly ``vocab_size`` ids: the 256 byte symbols, filler tokens, and
    the ChatML special tokens at the top ids. Returns special token -> id."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level tokenizer")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    first_special = vocab_size - len(SPECIAL_TOKENS)
    # Filler ids decode as short lowercase "words" (byte-level "Ġ" is a leading space), so random-weight
    # output is readable gibberish rather than placeholder names.
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = (f"\u0120{a}{b}" for a in letters for b in letters)
    for i in range(len(vocab), first_special):
        vocab[next(words, f"<filler_{i}>")] = i
    specials = {tok: first_special + j for j, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": chat_template}, indent=2))
    return specials


def write_random_checkpoint(out_dir: str | Path, config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            std: float = 0.02, max_shard_bytes: int = 2 << 30) -> Path:
    """Write config.json and random weights (normal(0, std); norms are ones) for ``config``, sharded with an
    index when larger than ``max_shard_bytes``. Returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = spec_from_config(config)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in checkpoint_tensors(spec).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen) * std).to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def demo_qwen3_moe_config(vocab_size: int = 512) -> dict:
    """A small Qwen3-MoE configuration (the demo model): 4 layers, 16 experts top-4."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab_size,
        "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 16,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
