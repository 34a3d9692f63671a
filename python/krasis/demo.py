"""The demo model: a small random-weight Qwen3-MoE checkpoint written to ~/.krasis/models/ so Krasis runs
end to end on a fresh machine with no model downloaded."""

from __future__ import annotations

import logging
from pathlib import Path

from .paths import models_dir
from .synthetic import demo_qwen3_moe_config, write_random_checkpoint, write_tokenizer

log = logging.getLogger("krasis")

DEMO_NAME = "krasis-demo-qwen3-moe"


def ensure_demo_model() -> Path:
    """Path of the demo model, writing it first if it is not there (a few MB, about a second)."""
    out = models_dir() / DEMO_NAME
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = demo_qwen3_moe_config()
    specials = write_tokenizer(tmp, config["vocab_size"])
    config["eos_token_id"] = specials["<|im_end|>"]
    write_random_checkpoint(tmp, config, seed=1234)
    tmp.rename(out)  # complete or absent: never a half-written model
    log.info("wrote the demo model to %s", out)
    return out
