"""The launcher's command-line flags, and how the saved config fills in what the command line leaves out."""

from __future__ import annotations

import argparse
import sys

from ..errors import InvalidInputError
from .benchmark import DEFAULT_DECODE_PROMPTS, DEFAULT_DECODE_TOKENS, DEFAULT_LENGTHS, DEFAULT_TTFT_TOKENS
from .config import BY_NAME, OPTIONS, parse_text

MULTI_GPU_NOTE = ("krasis: note: multi-GPU runs arrive with issue 12; running on one GPU ({gpu}) for now, "
                  "the other selected GPUs stay idle")


def _lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, not {text!r}")
    return values


def _gpus(text: str) -> list[int]:
    try:
        return parse_text(BY_NAME["gpus"], text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launcher (defaults come from the saved config ~/.krasis/config when present)")
    g.add_argument("--models-dir", help="another folder the TUI scans for models, besides ~/.krasis/models")
    g.add_argument("--gguf-path", metavar="FILE.gguf",
                   help="take the CPU routed experts from this llama.cpp GGUF of the same model, read in place "
                        "(the rest of the model comes from --model-path; a split GGUF is given by any one part); "
                        "runs on --device cpu with --cpu-expert-bits left at 16")
    g.add_argument("--num-gpus", type=int, help="GPUs to use (default 1; more than 1 arrives with issue 12)")
    g.add_argument("--gpus", type=_gpus, help="which GPUs, as indices, e.g. 0,1 (default: the first)")
    g.add_argument("--ignore-config", action="store_true",
                   help="use the built-in defaults, not the saved config (the command-line flags still apply)")
    b = p.add_argument_group("benchmarks")
    b.add_argument("--benchmark", action="store_true",
                   help="after loading, measure prefill, time to first token and decode; print a table and save a "
                        "JSON + markdown record (with --serve: then serve)")
    b.add_argument("--benchmark-lengths", type=_lengths, default=list(DEFAULT_LENGTHS),
                   help="prefill prompt lengths, tokens, comma-separated (default 10000,20000,35000,50000; those "
                        "that do not fit the context are skipped)")
    b.add_argument("--benchmark-ttft-tokens", type=int, default=DEFAULT_TTFT_TOKENS,
                   help="prompt length whose time to first token is reported (default 20000; the nearest run length)")
    b.add_argument("--benchmark-decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS,
                   help="tokens decoded per prompt (default 64)")
    b.add_argument("--benchmark-decode-prompts", type=int, default=DEFAULT_DECODE_PROMPTS,
                   help="different prompts the decode speed is averaged over (default 3)")
    b.add_argument("--results-dir", default=None,
                   help="where benchmark records go (default ~/.krasis/benchmarks)")
    b.add_argument("--benchmark-suite", nargs="?", const="benchmarks/benchmark_suite.toml", default=None,
                   metavar="FILE", help="run every [[config]] x [[model]] of FILE (default "
                                        "benchmarks/benchmark_suite.toml), each in its own subprocess")
    q = p.add_argument_group("perplexity")
    q.add_argument("--perplexity", action="store_true", help="measure perplexity on --dataset and exit")
    q.add_argument("--dataset", help="a .txt file, or a folder of .txt files")
    q.add_argument("--window", type=int, default=2048, help="tokens per window (default 2048)")
    q.add_argument("--stride", type=int, default=1024, help="tokens between window starts (default 1024)")
    # every saved-config option defaults to "not given", so that the config (or its defaults) fills it in
    p.set_defaults(**{o.name: None for o in OPTIONS})


def given_options(args: argparse.Namespace) -> dict:
    """The config options set on the command line."""
    return {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name, None) is not None}


def apply_config(args: argparse.Namespace, config: dict) -> None:
    """Fill every option the command line did not give from ``config``; the command line wins."""
    for o in OPTIONS:
        if getattr(args, o.name, None) is None:
            setattr(args, o.name, config[o.name])
    args.model_path = args.model_path or None


def settings(args: argparse.Namespace) -> dict:
    """The options in effect (for records and logs)."""
    return {o.name: getattr(args, o.name) for o in OPTIONS}


def gguf_problem(gguf_path: str | None, cpu_expert_bits: int) -> str | None:
    """Why GGUF experts cannot run with these settings (the message names the fix), or None when they can (or no
    GGUF is given). Shared by ``krasis`` and ``python -m krasis.server``."""
    if not gguf_path:
        return None
    if cpu_expert_bits != 16:
        return (f"--gguf-path {gguf_path} was given with --cpu-expert-bits {cpu_expert_bits}: the GGUF's own block "
                "types set the CPU experts' format, so there is nothing to quantise. Leave --cpu-expert-bits at 16 "
                "(pass --cpu-expert-bits 16 to override the saved config's cpu_expert_bits), or drop --gguf-path "
                f"(and clear gguf_path in the saved config) to build INT{cpu_expert_bits} experts from the model")
    return None


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations the runtime cannot run yet, with the reason; note what is narrowed."""
    if args.num_gpus < 1:
        raise InvalidInputError(f"--num-gpus must be at least 1, not {args.num_gpus}")
    problem = gguf_problem(args.gguf_path, args.cpu_expert_bits)
    if problem:
        raise InvalidInputError(problem)
    if args.device != "cuda":
        if args.num_gpus > 1:
            print(f"krasis: note: --num-gpus {args.num_gpus} is ignored on the CPU path", file=sys.stderr)
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return  # LLM reports that no GPU is visible
    if args.num_gpus > count:
        raise InvalidInputError(f"--num-gpus {args.num_gpus}: this machine has {count} GPU(s)")
    bad = [g for g in args.gpus if g >= count]
    if bad:
        raise InvalidInputError(f"GPU indices {bad} do not exist: this machine has {count} GPU(s) (0..{count - 1})")
    first = args.gpus[0] if args.gpus else 0
    torch.cuda.set_device(first)
    if args.num_gpus > 1 or len(args.gpus) > 1:
        print(MULTI_GPU_NOTE.format(gpu=first), file=sys.stderr)
