"""The launcher's saved settings: ``~/.krasis/config`` (TOML), one key per option.

Every option is declared once in ``OPTIONS`` (type, default, allowed values, help); loading, validation,
saving, the command-line overrides and the TUI's editor all read that table. Options whose default is None
("decided by the engine") are simply absent from the file until set.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from ..engine.decode_modes import DECODE_MODES
from ..errors import KrasisError
from ..paths import krasis_home

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(KrasisError):
    """The saved config file cannot be used; the message names the file, the key and what it expects."""


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # "str", "int", "bool", "choice", "int_list"
    default: Any
    help: str
    choices: tuple = ()
    minimum: int | None = None
    maximum: int | None = None

    def expected(self) -> str:
        """What a valid value looks like, in words (for error messages)."""
        if self.kind == "choice":
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.kind == "int":
            low = "" if self.minimum is None else f" >= {self.minimum}"
            high = "" if self.maximum is None else f" and <= {self.maximum}"
            return f"an integer{low}{high}" + (" (or absent: decided by the engine)" if self.default is None else "")
        if self.kind == "bool":
            return "true or false"
        if self.kind == "int_list":
            return "a list of GPU indices >= 0, e.g. [0, 1]"
        return "a string"


def _opt(name, kind, default, help, choices=(), minimum=None, maximum=None) -> Option:
    return Option(name, kind, default, help, tuple(choices), minimum, maximum)


OPTIONS: tuple[Option, ...] = (
    _opt("model_path", "str", "", "Hugging Face model directory (empty: the random-weight demo model)"),
    _opt("models_dir", "str", "", "an extra folder the TUI scans for models, besides ~/.krasis/models"),
    _opt("gguf_path", "str", "", "CPU routed experts from this llama.cpp GGUF of the model, read in place "
         "(empty: from the model itself; runs on the CPU with cpu_expert_bits 16)"),
    _opt("device", "choice", "cpu", "where to run: cpu, or cuda (the GPU engine)", ("cpu", "cuda")),
    _opt("gpus", "int_list", [], "the GPUs chosen in the TUI (indices); the engine runs on the first"),
    _opt("num_gpus", "int", 1, "GPUs to use (more than 1 arrives with issue 12)", minimum=1),
    _opt("dtype", "choice", "bfloat16", "compute dtype", ("float32", "bfloat16")),
    _opt("cpu_expert_bits", "choice", 16, "routed experts on the CPU: 16 unquantised, 8 or 4 (INT8/INT4)",
         (16, 8, 4)),
    _opt("gpu_expert_bits", "choice", 4, "routed experts for the GPU engine's kernels (prefill, hot cache)", (4, 8)),
    _opt("shared_expert_quant", "choice", "int8", "shared experts", ("int8", "bf16")),
    _opt("dense_mlp_quant", "choice", "int8", "dense MLP layers", ("int8", "bf16")),
    _opt("lm_head_quant", "choice", "int8", "the output projection", ("int8", "bf16")),
    _opt("attention_quant", "choice", "bf16", "attention projections", ("bf16", "int8")),
    _opt("group_size", "choice", 128, "values per quantisation scale", (32, 64, 128)),
    _opt("kv_dtype", "choice", None, "KV cache storage (absent: fp8 on the GPU engine, the compute dtype on the "
         "CPU)", ("auto", "bf16", "fp8")),
    _opt("kv_cache_mb", "int", None, "KV cache size, MiB (absent: planned)", minimum=1),
    _opt("vram_budget_mb", "int", None, "VRAM the runtime may use, MiB (absent: free memory less 1 GiB)",
         minimum=1),
    _opt("layer_group_size", "int", None, "MoE layers streamed to VRAM together during prefill (absent: 1)",
         minimum=1),
    _opt("hcs", "bool", True, "keep hot experts resident in VRAM"),
    _opt("hcs_experts", "int", None, "at most this many hot experts in VRAM (absent: as many as fit)", minimum=0),
    _opt("cuda_graphs", "bool", True, "replay decode steps as captured CUDA graphs"),
    _opt("decode_mode", "choice", "auto", "where decode runs the experts not in the hot cache: auto (the fastest "
         "share, found by timing), cpu, gpu (copied each step) or hybrid (split by measured rates)", DECODE_MODES),
    _opt("prefetch_experts", "int", 0, "in decode, likely experts of each next MoE layer copied to VRAM while the CPU "
         "computes a layer (0: off; at most the router's top-k)", minimum=0),
    _opt("read_ahead_experts", "int", None, "in decode, likely CPU experts of each next MoE layer whose weights the "
         "CPU reads into its caches while the GPU runs that layer's attention (absent: 3; 0: off)", minimum=0,
         maximum=8),
    _opt("threads", "int", None, "CPU expert kernel threads (absent: physical cores)", minimum=1),
    _opt("host", "str", "127.0.0.1", "address the server listens on"),
    _opt("port", "int", 8012, "port the server listens on", minimum=1, maximum=65535),
)
BY_NAME = {o.name: o for o in OPTIONS}


def config_path() -> Path:
    return krasis_home() / "config"


def defaults() -> dict[str, Any]:
    return {o.name: (list(o.default) if isinstance(o.default, list) else o.default) for o in OPTIONS}


def check_value(option: Option, value: Any) -> Any:
    """``value`` if it is valid for ``option`` (None only where the default is None); else ValueError naming what
    is expected."""
    if value is None and option.default is None:
        return None
    ok = False
    if option.kind == "str":
        ok = isinstance(value, str)
    elif option.kind == "bool":
        ok = isinstance(value, bool)
    elif option.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (option.minimum is None or value >= option.minimum)
        ok = ok and (option.maximum is None or value <= option.maximum)
    elif option.kind == "choice":
        ok = not isinstance(value, bool) and value in option.choices
    elif option.kind == "int_list":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if not ok:
        raise ValueError(f"{option.name} must be {option.expected()}, not {value!r}")
    return value


def parse_text(option: Option, text: str) -> Any:
    """A value typed into the TUI or given on a command line, parsed and checked; ValueError with the reason."""
    text = text.strip()
    if option.kind == "str":
        return text
    if text == "":
        if option.default is None:
            return None
        raise ValueError(f"{option.name} needs a value: {option.expected()}")
    if option.kind == "bool":
        if text.lower() in ("true", "yes", "on", "1"):
            return True
        if text.lower() in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{option.name} must be {option.expected()}, not {text!r}")
    if option.kind == "int_list":
        try:
            value = [int(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"{option.name} must be {option.expected()}, not {text!r}") from None
        return check_value(option, value)
    if option.kind == "int" or (option.kind == "choice" and isinstance(option.choices[0], int)):
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{option.name} must be {option.expected()}, not {text!r}") from None
        return check_value(option, value)
    return check_value(option, text)


def validate(raw: dict, source: Path | str) -> dict[str, Any]:
    """The full settings (defaults filled in) from a parsed TOML table; ConfigError naming ``source``, the key and
    the expected value at the first problem."""
    config = defaults()
    for key, value in raw.items():
        option = BY_NAME.get(key)
        if option is None:
            raise ConfigError(f"{source}: unknown key {key!r}; expected one of {', '.join(BY_NAME)} "
                              "(fix or delete the file)")
        try:
            config[key] = check_value(option, value)
        except ValueError as e:
            raise ConfigError(f"{source}: key {key!r} must be {option.expected()}, not {value!r} "
                              "(fix or delete the file)") from e
    return config


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The saved settings, or the defaults when there is no file; ConfigError when it is unreadable or invalid."""
    path = path or config_path()
    if not path.exists():
        return defaults()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e}); fix its permissions or delete it") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix or delete the file") from e
    return validate(raw, path)


def save_config(config: dict[str, Any], path: Path | None = None) -> Path:
    """Write the settings (validated first) atomically; options left to the engine (None) are not written."""
    path = path or config_path()
    checked = validate({k: v for k, v in config.items() if v is not None}, "settings to save")
    body = {k: v for k, v in checked.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    header = "# Krasis launcher settings (written by `krasis`; every key is described in ADVANCED.md)\n"
    tmp.write_text(header + tomli_w.dumps(body), encoding="utf-8")
    tmp.replace(path)
    return path
