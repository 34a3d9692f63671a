"""``krasis --benchmark-suite [FILE]``: every ``[[config]]`` times every ``[[model]]`` of a TOML file, each
combination benchmarked (``krasis --non-interactive --benchmark``) in its own subprocess, with its log in
``suite_logs/`` beside the file and a markdown summary at the end. A ``[[model]]`` with ``gguf_name`` or
``gguf_path`` runs with ``--gguf-path`` (CPU experts from that GGUF). A combination that fails (missing model or
GGUF, out of memory, crash, timeout) is a row saying why; the suite goes on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..paths import models_dir
from .config import BY_NAME, ConfigError, check_value, tomllib

BENCH_KEYS = {"benchmark_lengths": "--benchmark-lengths", "ttft_tokens": "--benchmark-ttft-tokens",
              "decode_tokens": "--benchmark-decode-tokens", "decode_prompts": "--benchmark-decode-prompts"}
MODEL_KEYS = ("name", "path", "gguf_name", "gguf_path")
SUITE_KEYS = ("timeout_s",)
DEFAULT_TIMEOUT_S = 3600
NOT_CONFIG = ("model_path", "models_dir", "gguf_path", "gpus")  # set per model, or TUI-only


def default_suite_file() -> Path:
    return Path("benchmarks") / "benchmark_suite.toml"


@dataclass
class Row:
    model: str
    config: str
    ok: bool
    reason: str = ""
    record: dict | None = None
    log: Path | None = None
    seconds: float = 0.0


def load_suite(path: Path) -> dict:
    """The parsed suite; ConfigError naming the file, entry and key at the first problem."""
    try:
        suite = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"benchmark suite {path} cannot be read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"benchmark suite {path} is not valid TOML ({e})") from e
    for key in suite:
        if key not in ("config", "model", *SUITE_KEYS):
            raise ConfigError(f"{path}: unknown top-level key {key!r}; expected [[config]], [[model]] or timeout_s")
    if not suite.get("config") or not suite.get("model"):
        raise ConfigError(f"{path}: needs at least one [[config]] and one [[model]] entry")
    for i, entry in enumerate(suite["config"]):
        for key, value in entry.items():
            if key == "name" or key in BENCH_KEYS:
                continue
            if key not in BY_NAME or key in NOT_CONFIG:
                raise ConfigError(f"{path}: [[config]] #{i + 1}: unknown key {key!r}")
            try:
                check_value(BY_NAME[key], value)
            except ValueError as e:
                raise ConfigError(f"{path}: [[config]] #{i + 1}: key {key!r}: {e}") from e
    for i, entry in enumerate(suite["model"]):
        unknown = [k for k in entry if k not in MODEL_KEYS]
        if unknown or not (entry.get("name") or entry.get("path")):
            raise ConfigError(f"{path}: [[model]] #{i + 1}: needs `name` (a directory under the models folder) "
                              f"and takes only {', '.join(MODEL_KEYS)}" + (f"; unknown: {unknown}" if unknown
                                                                           else ""))
    return suite


def model_label(entry: dict) -> str:
    """The model's name in the summary and the log names; a GGUF row adds the GGUF's file name."""
    name = entry.get("name") or Path(entry["path"]).name
    gguf = entry.get("gguf_name") or (Path(entry["gguf_path"]).name if entry.get("gguf_path") else "")
    return f"{name} + {gguf}" if gguf else name


def config_label(entry: dict, index: int) -> str:
    if entry.get("name"):
        return str(entry["name"])
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in BENCH_KEYS) or f"config {index + 1}"


# boolean config keys that default to on, and the flag that turns each off
OFF_FLAGS = {"hcs": "--no-hcs", "cuda_graphs": "--no-cuda-graphs"}


def config_flags(entry: dict) -> list[str]:
    flags: list[str] = []
    for key, value in entry.items():
        if key == "name":
            continue
        if key in BENCH_KEYS:
            value = ",".join(str(v) for v in value) if isinstance(value, list) else value
            flags += [BENCH_KEYS[key], str(value)]
        elif key in OFF_FLAGS:
            flags += [] if value else [OFF_FLAGS[key]]
        else:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def resolve_model(entry: dict, root: Path) -> tuple[Path | None, Path | None, str]:
    """(model directory, GGUF file or None, "") or (None, None, why it cannot run). ``gguf_name`` is searched for
    under ``root`` (the models folder), ``gguf_path`` is taken as given."""
    path = Path(entry["path"]).expanduser() if entry.get("path") else root / entry["name"]
    if not (path / "config.json").is_file():
        return None, None, f"model not found: {path} has no config.json"
    gguf = None
    if entry.get("gguf_path"):
        gguf = Path(entry["gguf_path"]).expanduser()
        if not gguf.is_file():
            return None, None, f"GGUF file {gguf} not found"
    elif entry.get("gguf_name"):
        gguf = next((p for p in sorted(root.rglob(entry["gguf_name"])) if p.is_file()), None)
        if gguf is None:
            return None, None, f"GGUF file {entry['gguf_name']} not found under {root}"
    return path, gguf, ""


def benchmark_command(python: str, model_dir: Path, gguf: Path | None, results: Path, config: dict) -> list[str]:
    """The subprocess that benchmarks one combination (the saved config ignored, so nothing leaks in)."""
    command = [python, "-m", "krasis.cli", "--non-interactive", "--ignore-config", "--benchmark",
               "--model-path", str(model_dir)]
    if gguf is not None:
        command += ["--gguf-path", str(gguf)]
    return command + ["--results-dir", str(results), *config_flags(config)]


def _failure_reason(log_text: str, returncode: int) -> str:
    lower = log_text.lower()
    if "out of memory" in lower or "outofmemoryerror" in lower:
        return "out of memory"
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    errors = re.findall(r"krasis: error: (.*)", log_text)
    if errors:
        return errors[-1].strip()
    lines = [line for line in log_text.strip().splitlines() if line.strip()]
    return f"exit status {returncode}" + (f": {lines[-1].strip()}" if lines else "")


def run_suite(path: Path, models_root: Path | None = None, logs_dir: Path | None = None,
              python: str = sys.executable, echo=print) -> tuple[list[Row], Path]:
    """Run every combination; returns the rows and the summary file's path."""
    suite = load_suite(path)
    root = models_root or models_dir()
    logs = logs_dir or path.parent / "suite_logs"
    logs.mkdir(parents=True, exist_ok=True)
    timeout = suite.get("timeout_s", DEFAULT_TIMEOUT_S)
    rows: list[Row] = []
    combos = [(m, c, ci) for m in suite["model"] for ci, c in enumerate(suite["config"])]
    for n, (model, config, ci) in enumerate(combos):
        name, label = model_label(model), config_label(config, ci)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}__{config.get('name') or f'config{ci + 1}'}")
        log = logs / f"{slug}.log"
        echo(f"[{n + 1}/{len(combos)}] {name} / {label}")
        model_dir, gguf, why = resolve_model(model, root)
        if model_dir is None:
            log.write_text(why + "\n")
            rows.append(Row(name, label, False, why, log=log))
            echo(f"    failed: {why}")
            continue
        results = logs / f"{slug}_results"
        command = benchmark_command(python, model_dir, gguf, results, config)
        start = time.perf_counter()
        with open(log, "w") as out:
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            try:
                proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                      env=dict(os.environ))
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        seconds = time.perf_counter() - start
        records = sorted(results.glob("*.json")) if results.is_dir() else []
        if code == 0 and records:
            record = json.loads(records[-1].read_text())
            rows.append(Row(name, label, True, record=record, log=log, seconds=seconds))
            echo(f"    ok ({seconds:.0f} s)")
        else:
            reason = f"timed out after {timeout} s" if code is None else _failure_reason(log.read_text(), code)
            rows.append(Row(name, label, False, reason, log=log, seconds=seconds))
            echo(f"    failed: {reason}")
    summary = logs / f"summary_{datetime.now().strftime('%Y%m%d-%H%M%S')}.md"
    summary.write_text(summary_table(rows, path))
    return rows, summary


def summary_table(rows: list[Row], path: Path) -> str:
    lines = [f"# Krasis benchmark suite: {path}", "",
             "| model | config | status | best prefill tok/s (tokens) | TTFT s (tokens) | decode tok/s | log |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r.ok:
            b, t, d = r.record["best_prefill"], r.record["ttft"], r.record["decode"]
            lines.append(f"| {r.model} | {r.config} | ok | {b['tokens_per_second']:,.1f} ({b['tokens']}) | "
                         f"{t['seconds']:.3f} ({t['tokens']}) | {d['tokens_per_second']:,.2f} | {r.log.name} |")
        else:
            reason = r.reason.replace("|", "/").replace("\n", " ")
            lines.append(f"| {r.model} | {r.config} | failed: {reason} | | | | {r.log.name if r.log else ''} |")
    return "\n".join(lines) + "\n"
