"""``krasis --benchmark``: after loading, prefill prompts of several lengths (those that fit the context), time
to first token at one length, and decode speed over a few different prompts; a table on screen and a JSON +
markdown record in a results folder.

Prompts are random token ids (the speed of a forward does not depend on which tokens). Prefill is timed as
``generate(ids, max_new_tokens=1)``, i.e. to the first new token; tok/s = prompt tokens / that time. Decode
streams N tokens after each prompt with EOS ignored; tok/s = (N - 1) / (last - first token time), averaged
over the prompts.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from ..models.spec import attention_summary, routing_summary
from ..paths import krasis_home

DEFAULT_LENGTHS = (10000, 20000, 35000, 50000)
DEFAULT_TTFT_TOKENS = 20000
DEFAULT_DECODE_TOKENS = 64
DEFAULT_DECODE_PROMPTS = 3
DECODE_PROMPT_TOKENS = 128


def results_dir() -> Path:
    return krasis_home() / "benchmarks"


def context_limit(llm) -> int:
    """Most tokens one sequence may hold: the model's context, or the GPU engine's KV cache if smaller."""
    limit = llm.max_context
    if llm.plan is not None:
        limit = min(limit, llm.plan.kv_tokens)
    return limit


def fitting_lengths(lengths: list[int], limit: int) -> tuple[list[int], list[int], bool]:
    """(lengths to run, lengths skipped, scaled): the lengths whose prompt plus one new token fit ``limit``;
    when none does, all of them scaled down so that the longest fits (a small model's short context)."""
    fits = [n for n in lengths if n + 1 <= limit]
    if fits:
        return fits, [n for n in lengths if n + 1 > limit], False
    top = max(lengths)
    scaled = sorted({max(1, n * (limit - 1) // top) for n in lengths})
    return scaled, list(lengths), True


def _stderr(message: str) -> None:
    print(f"krasis: benchmark: {message}", file=sys.stderr, flush=True)


def _sync(llm) -> None:
    if llm.device.type == "cuda":
        import torch

        torch.cuda.synchronize(llm.device)


def _random_ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def run_benchmark(llm, lengths: list[int] = DEFAULT_LENGTHS, ttft_tokens: int = DEFAULT_TTFT_TOKENS,
                  decode_tokens: int = DEFAULT_DECODE_TOKENS, decode_prompts: int = DEFAULT_DECODE_PROMPTS,
                  settings: dict | None = None, progress=_stderr) -> dict:
    """Measure ``llm``; returns the record (see ADVANCED.md, "Benchmark record")."""
    rng = random.Random(0)
    vocab = llm.spec.vocab_size
    limit = context_limit(llm)
    run, skipped, scaled = fitting_lengths(sorted(lengths), limit)
    if scaled:
        progress(f"no prompt length of {lengths} fits the context ({limit} tokens); running {run} instead")
    elif skipped:
        progress(f"skipping {skipped}: longer than the context ({limit} tokens)")
    ttft_at = min(run, key=lambda n: (abs(n - ttft_tokens), -n))
    progress("warm-up")
    llm.generate(_random_ids(rng, vocab, min(16, limit - 1)), max_new_tokens=1)
    prefill = []
    for i, n in enumerate(run):
        progress(f"prefill {n} tokens ({i + 1}/{len(run)})")
        ids = _random_ids(rng, vocab, n)
        _sync(llm)
        start = time.perf_counter()
        llm.generate(ids, max_new_tokens=1)
        _sync(llm)
        seconds = time.perf_counter() - start
        prefill.append({"tokens": n, "seconds": seconds, "tokens_per_second": n / seconds})
    ttft = next(p for p in prefill if p["tokens"] == ttft_at)
    decode_tokens = max(2, min(decode_tokens, limit - 2))
    prompt_len = max(1, min(DECODE_PROMPT_TOKENS, limit - decode_tokens))
    eos, llm.eos_token_ids = llm.eos_token_ids, set()  # a random EOS must not end a timed run early
    per_prompt = []
    try:
        for i in range(decode_prompts):
            progress(f"decode {decode_tokens} tokens after prompt {i + 1}/{decode_prompts}")
            stamps = []
            for _ in llm.stream(_random_ids(rng, vocab, prompt_len), max_new_tokens=decode_tokens):
                _sync(llm)
                stamps.append(time.perf_counter())
            per_prompt.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    finally:
        llm.eos_token_ids = eos
    best = max(prefill, key=lambda p: p["tokens_per_second"])
    return {
        "krasis_version": _version(),
        "timestamp": datetime.now().isoformat(timespec="seconds"),
        "model": llm.model_path.name,
        "model_path": str(llm.model_path),
        "architecture": {"family": llm.spec.family, "layers": llm.spec.num_layers,
                         "attention": attention_summary(llm.spec), "routing": routing_summary(llm.spec)},
        "settings": settings or {},
        "hardware": _hardware(llm),
        "context_limit": limit,
        "prefill": prefill,
        "skipped_lengths": skipped if not scaled else [],
        "scaled_lengths": scaled,
        "best_prefill": {"tokens": best["tokens"], "tokens_per_second": best["tokens_per_second"]},
        "ttft": {"tokens": ttft_at, "seconds": ttft["seconds"]},
        "decode": {"tokens": decode_tokens, "prompt_tokens": prompt_len, "prompts": decode_prompts,
                   "tokens_per_second": statistics.mean(per_prompt), "per_prompt": per_prompt},
        "engine_report": _jsonable(llm.engine_report()),
        "command": " ".join(["krasis", *sys.argv[1:]]),
    }


def _version() -> str:
    from .. import __version__

    return __version__


def _hardware(llm) -> dict:
    import os

    hw = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "device": llm.device.type}
    if llm.device.type == "cuda":
        import torch

        hw["gpu"] = torch.cuda.get_device_name(llm.device)
    return hw


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def _architecture_line(record: dict) -> str:
    a = record.get("architecture") or {}
    parts = [f"{a.get('family', '?')}, {a.get('layers', '?')} layers", a.get("attention"), a.get("routing")]
    return "Model: " + "; ".join(p for p in parts if p)


def table(record: dict) -> str:
    """The record as a markdown table (printed on screen and saved beside the JSON)."""
    lines = [f"# Krasis benchmark: {record['model']}", "",
             f"{record['timestamp']}, krasis {record['krasis_version']}, {record['hardware']['device']}"
             + (f" ({record['hardware']['gpu']})" if "gpu" in record["hardware"] else "")
             + f", context limit {record['context_limit']} tokens", "", _architecture_line(record), "",
             "| measure | tokens | seconds | tok/s |", "|---|---:|---:|---:|"]
    for p in record["prefill"]:
        lines.append(f"| prefill | {p['tokens']} | {p['seconds']:.3f} | {p['tokens_per_second']:,.1f} |")
    t, d, b = record["ttft"], record["decode"], record["best_prefill"]
    lines.append(f"| time to first token | {t['tokens']} | {t['seconds']:.3f} | |")
    lines.append(f"| decode (mean of {d['prompts']} prompts) | {d['tokens']} | | {d['tokens_per_second']:,.2f} |")
    lines += ["", f"Best prefill: {b['tokens_per_second']:,.1f} tok/s at {b['tokens']} tokens."]
    if record["skipped_lengths"]:
        lines.append(f"Skipped (longer than the context): {record['skipped_lengths']}.")
    if record["scaled_lengths"]:
        lines.append("No requested length fitted the context; the lengths were scaled down to fit.")
    settings = ", ".join(f"{k}={v}" for k, v in record["settings"].items() if v not in (None, ""))
    lines += ["", f"Settings: {settings}", "", f"Command: `{record['command']}`", ""]
    return "\n".join(lines)


def write_record(record: dict, directory: Path | None = None) -> tuple[Path, Path]:
    """Save ``<stamp>_<model>.json`` and ``.md`` in ``directory`` (default ~/.krasis/benchmarks)."""
    directory = Path(directory or results_dir())
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{record['timestamp'].replace(':', '')}_{record['model']}"
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(table(record))
    return json_path, md_path
