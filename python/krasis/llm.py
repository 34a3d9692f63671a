"""``krasis.LLM``: load a model directory and run it (prompt logits, generation)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .cache import QuantConfig, ensure_cache
from .cache.files import write_json_atomic
from .cache.loader import load_cached_weights
from .checkpoint import Checkpoint
from .engine.forward import Forward
from .engine.kv_cache import KV_DTYPES, KVCache
from .engine.sampling import sample
from .engine.weights import ModelWeights, load_weights
from .errors import InvalidInputError
from .models import spec_from_config
from .models.shapes import matmul_flops_per_token
from .tokenizer import Tokenizer

log = logging.getLogger("krasis")
# the hot-expert heat map (routing counts per layer and expert) kept beside the weight cache
HEAT_MAP = "hcs_heat.json"
NO_HOT_CACHE = "the hot-expert cache exists only in the GPU engine (device='cuda' with expert_bits 8 or 4)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERT_BITS = (16, 8, 4)
LOGIT_ROWS = 512
# A caller holding a token longer than this (seconds) while pipelined decode has the next step queued gets that
# step run again: the step's GPU side waits for the host only so long (tens of seconds, ``kernels.host_signal``).
PIPELINE_PAUSE_S = 1.0
# ``warm_up``'s generation: enough decode steps for ``auto`` to try its shares once (engine.decode_modes.AutoSplit)
WARMUP_TEXT = "Krasis warm-up: a short prompt whose answer nobody reads."
WARMUP_PROMPT_TOKENS = 64
WARMUP_TOKENS = 40


def _eos_ids(model_dir: Path, config_eos: tuple[int, ...], tokenizer: Tokenizer) -> set[int]:
    ids = set(config_eos)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y or n >= limit:
            break
        n += 1
    return n


class LLM:
    """A loaded model.

    device: "cpu" or "cuda"; expert_bits: 16 (unquantised), 8 or 4; dtype: compute dtype of everything
    that is not quantised ("float32" or "bfloat16"). With expert_bits 8 or 4 the weights come from the weight
    cache (built on first use): ``quant`` sets the other parts' formats (default: INT8 dense MLPs, shared
    experts and lm_head, BF16 attention, group size 128); ``verify_cache`` checks every cache file's checksum.

    On "cuda" with expert_bits 8 or 4 the model runs hybrid: non-expert weights in VRAM, routed experts
    streamed through VRAM for prefill and run on the CPU (or from the VRAM hot-expert cache) for decode.
    ``vram_budget_mb`` caps what it may use (default: free memory less 1 GiB); ``kv_dtype`` is "auto" (the
    compute dtype), "bf16" or "fp8" (the GPU default); ``kv_cache_mb``, ``layer_group_size``, ``hcs`` (hot-expert
    cache on/off) and ``hcs_experts`` (at most this many hot experts) override the VRAM plan's choices;
    ``decode_mode`` ("auto", "cpu", "gpu", "hybrid") says where decode runs the experts not in the hot cache,
    ``cuda_graphs`` replays decode steps as CUDA graphs (default on), ``prefetch_experts`` (default 0: off)
    copies that many of each next MoE layer's likely experts to VRAM while the CPU computes a layer, and
    ``read_ahead_experts`` (default None: the engine's, 3) has the CPU read that many of them into its caches while
    the GPU runs the layer's attention.
    ``hybrid`` (default: on for "cuda" with quantised experts) can also run that engine on "cpu", with its
    Triton kernels in the interpreter (TRITON_INTERPRET=1): a slow mode for testing without a GPU.

    ``gguf_path`` takes the routed experts from a llama.cpp GGUF of the same model (its blocks read in place by
    the Rust GGUF kernels; see ADVANCED.md "GGUF experts"); the expert format comes from the GGUF, so leave
    ``expert_bits`` at its default. On "cpu" the other weights come in ``dtype`` from the Hugging Face model (no
    weight cache is built); on "cuda" the GPU engine runs with its own experts built from the model at
    ``quant.gpu_expert_bits`` and the GGUF's experts for decode on the CPU.
    """

    def __init__(self, model_path: str | Path, device: str = "cpu", expert_bits: int = 16, dtype: str = "float32",
                 quant: QuantConfig | None = None, verify_cache: bool = False, progress: bool = True,
                 vram_budget_mb: int | None = None, kv_dtype: str | None = None, kv_cache_mb: int | None = None,
                 layer_group_size: int | None = None, hcs: bool = True, hcs_experts: int | None = None,
                 hybrid: bool | None = None, gguf_path: str | Path | None = None, cuda_graphs: bool = True,
                 decode_mode: str = "auto", prefetch_experts: int = 0, read_ahead_experts: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if expert_bits not in EXPERT_BITS:
            raise ValueError(f"expert_bits must be 16, 8 or 4, not {expert_bits!r}")
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, not {kv_dtype!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA GPU is visible; use device='cpu'")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        self.model_path = Path(model_path)
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.expert_bits = expert_bits
        ckpt = Checkpoint(self.model_path)
        self.config = ckpt.config
        self.spec = spec_from_config(ckpt.config)
        self.tokenizer = Tokenizer(self.model_path)
        log.info("loading %s (%s, %d layers, %s experts) on %s in %s", self.model_path, self.spec.family,
                 self.spec.num_layers, self.spec.moe.num_experts if self.spec.moe else 0, device, dtype)
        if hybrid is None:
            hybrid = device == "cuda" and (expert_bits != 16 or gguf_path is not None)
        if hybrid and expert_bits == 16 and gguf_path is None:
            raise ValueError("the hybrid engine runs quantised experts: use expert_bits=8 or 4 with hybrid=True")
        if hybrid and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("hybrid=True on the CPU runs the GPU kernels in Triton's interpreter, a test mode: "
                             "set TRITON_INTERPRET=1 before starting Python, or use device='cuda'")
        self.kv_dtype = kv_dtype or ("fp8" if hybrid else "auto")
        self.plan, self.runtime = None, None
        self._kv: KVCache | None = None  # the one fixed cache that decode graphs captured (see new_cache)
        self._kv_owner = 0  # counts the calls that took ``_kv``: a generation holding an older count lost it
        self._graphs = None
        self.cache_dir: Path | None = None  # the weight cache in use (quantised runs)
        self.load_report: dict = {}
        start = time.perf_counter()
        self.gguf_experts = None
        cpu_store = None
        if gguf_path is not None:
            if not hybrid and device != "cpu":
                raise ValueError("GGUF experts on device='cuda' run in the GPU engine: leave hybrid at its default")
            cpu_store = self._open_gguf_experts(gguf_path, expert_bits)
        if cpu_store is not None and not hybrid:
            weights = self._gguf_cpu_weights(ckpt, cpu_store)
        elif expert_bits == 16 and cpu_store is None:
            weights = load_weights(ckpt, self.spec, self.dtype, self.device)
        else:
            if cpu_store is not None:  # GGUF CPU experts; the GPU's are built from the model at gpu_expert_bits
                quant = quant or QuantConfig()
                quant = replace(quant, cpu_expert_bits=quant.gpu_expert_bits)
            else:  # without a QuantConfig the GPU experts take the CPU width; with one, its gpu_expert_bits
                quant = replace(quant or QuantConfig(gpu_expert_bits=expert_bits), cpu_expert_bits=expert_bits)
            if hybrid and quant.gpu_expert_bits != expert_bits:
                log.info("GPU experts INT%d (prefill streaming, hot cache), CPU experts %s (decode)",
                         quant.gpu_expert_bits, f"INT{expert_bits}" if cpu_store is None else "from the GGUF")
            gguf = self.gguf_experts.identity() if cpu_store is not None else None
            directory, _ = ensure_cache(ckpt, self.spec, quant, verify=verify_cache, progress=progress,
                                        gpu_experts=hybrid, cpu_experts_from=gguf)
            self.cache_dir = directory
            self.load_report["cache_s"] = time.perf_counter() - start
            if hybrid:
                from .engine.hybrid_load import HybridOptions, load_hybrid  # imports the Triton kernels

                options = HybridOptions(vram_budget_mb, self.kv_dtype, kv_cache_mb, layer_group_size, hcs, hcs_experts)
                weights, self.runtime, self.plan = load_hybrid(ckpt, self.spec, self.dtype, quant, directory,
                                                               self.device, options, progress, cpu_store)
            else:
                weights = load_cached_weights(ckpt, self.spec, self.dtype, quant, directory)
        self._link_rates: dict | None = None  # CPU and GPU streaming rates (GB/s), measured for "hybrid"
        if self.runtime is not None:
            self.set_decode_mode(decode_mode)
        self.load_report["load_s"] = time.perf_counter() - start
        self._forward = Forward(self.spec, weights, self.dtype, self.device)
        self.eos_token_ids = _eos_ids(self.model_path, self.spec.eos_token_ids, self.tokenizer)
        self.max_context = self.spec.max_position_embeddings
        self._session: tuple[KVCache, list[int]] | None = None  # (cache, the tokens it holds) for prefix reuse
        # greedy decode through one-graph steps queues each step before the host has read the previous token
        # (``_greedy_pipelined``); False: one step at a time, as sampled decode runs (a baseline)
        self.pipeline_decode = True
        self.last_cached_tokens = 0
        if self.runtime is None and prefetch_experts:
            log.warning("prefetch_experts=%d is ignored: prefetch belongs to the GPU engine (device='cuda' with "
                        "quantised experts)", prefetch_experts)
        if self.runtime is None and read_ahead_experts:
            log.warning("read_ahead_experts=%d is ignored: it belongs to the GPU engine (device='cuda' with "
                        "quantised experts)", read_ahead_experts)
        if self.runtime is not None:
            if self.device.type == "cuda":
                self._start_decode_graphs(cuda_graphs)
            self.set_prefetch(prefetch_experts)
            if read_ahead_experts is not None:
                self.set_read_ahead(read_ahead_experts)
            if self.runtime.hcs.slots and self._heat_path().is_file():
                self._load_heat()

    def _start_decode_graphs(self, wanted: bool) -> None:
        from .engine.decode_graph import DecodeGraphs, graphs_unsupported

        why_not = graphs_unsupported(self._forward) if wanted else "cuda_graphs=False"
        if why_not is not None:
            log.info("decode: CUDA graphs off (%s); kernels are launched one by one", why_not)
            return
        self._kv = self._fresh_cache()
        self._graphs = DecodeGraphs(self._forward, self.runtime, self._kv)
        log.info("decode: CUDA graphs on (captured per KV-length bucket on first use)")

    def set_decode_mode(self, mode: str) -> None:
        """Where decode runs the routed experts that are not in the hot cache (``decode_mode`` of the
        constructor); may change between generations. The link rates "hybrid" splits by are measured on first
        use and kept."""
        from .engine.link_rates import cpu_read_gbps, gather_gbps

        if self.runtime is None:
            raise ValueError("decode modes belong to the GPU engine (device='cuda' with quantised experts)")
        self._quiesce()
        rates = {}
        if mode == "hybrid":
            if self._link_rates is None:
                cpu = cpu_read_gbps()
                # on the CPU (the interpreter test mode) there is no link to measure: the experts are split in half
                stream = gather_gbps(self.runtime.host[0].layout, self.device) if self.device.type == "cuda" else cpu
                self._link_rates = {"cpu_gbps": cpu, "stream_gbps": stream}
            rates = self._link_rates
        self.runtime.set_decode_mode(mode, **rates)
        share = self.runtime.gpu_share
        where = f"{100 * (1 - share):.0f}% on the CPU, {100 * share:.0f}% streamed to the GPU each step"
        if rates:
            where += (f" (measured: CPU reads {rates['cpu_gbps']:.1f} GB/s, the GPU streams from pinned memory at "
                      f"{rates['stream_gbps']:.1f} GB/s)")
        if mode == "auto":
            where = ("on the CPU or copied to the GPU in the share that decodes fastest: the first decode steps try "
                     "shares from 0 to 1 and keep the fastest, rechecked every few hundred steps")
        log.info("decode (%s mode): experts not in the hot cache run %s", mode, where)
        self.load_report["decode_mode"] = {"mode": mode, "gpu_share": share, **rates}

    def set_prefetch(self, experts: int) -> None:
        """Prefetch this many of the next MoE layer's likely experts per MoE layer in decode (0: off): predicted by
        that layer's router from the current hidden state and copied to VRAM while the CPU computes; the GPU then
        runs those the router picks. Works in one-graph decode steps (CUDA graphs on, the default)."""
        if self.runtime is None:
            raise ValueError("prefetch belongs to the GPU engine (device='cuda' with quantised experts)")
        k = self.spec.moe.router.top_k
        if not isinstance(experts, int) or not 0 <= experts <= k:
            raise ValueError(f"prefetch_experts must be a whole number from 0 to the router's top-k ({k}), not "
                             f"{experts!r}")
        self._quiesce()
        self.runtime.set_prefetch(experts)
        if not experts:
            return
        why_not = (self._graphs.prefetch_unsupported() if self._graphs is not None
                   else "decode does not run as one-graph CUDA graph steps here (needs device='cuda', cuda_graphs on)")
        if why_not is not None:
            log.warning("decode: prefetch of %d experts a layer was asked for but is off: %s", experts, why_not)
        else:
            log.info("decode: %d likely experts of each next MoE layer are copied to VRAM while the CPU computes a "
                     "layer (predicted by that layer's router)", experts)

    def set_read_ahead(self, experts: int) -> None:
        """Have the CPU read this many of the next MoE layer's likely CPU experts into its caches while the GPU runs
        that layer's attention, in one-graph decode steps (0: off). The GPU predicts them with that layer's router;
        a wrong guess costs idle DRAM time and changes no result."""
        if self.runtime is None:
            raise ValueError("read-ahead belongs to the GPU engine (device='cuda' with quantised experts)")
        self._quiesce()
        self.runtime.set_read_ahead(experts)  # a ValueError naming the range for anything else

    def _heat_path(self) -> Path:
        return self.cache_dir / HEAT_MAP

    def _load_heat(self) -> None:
        try:
            saved = json.loads(self._heat_path().read_text())
            filled = self.runtime.hcs.add_heat(np.asarray(saved["counts"], dtype=np.float64))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("hot-expert heat map %s not used (%s); the cache fills from this run's routing",
                        self._heat_path(), e)
            return
        log.info("hot-expert cache warmed from the saved heat map %s: %d experts resident", self._heat_path(), filled)

    def calibrate_hot_experts_from_text(self, path: str | Path) -> int:
        """Calibrate the hot-expert cache on a text file (split into prompts of at most one prefill chunk) and save
        the routing counts as a heat map beside the weight cache, which later loads of this model reuse. Returns
        how many experts are resident."""
        if self.runtime is None:
            raise InvalidInputError(NO_HOT_CACHE)
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise InvalidInputError(f"cannot read the calibration text {path}: {e.strerror or e}") from None
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidInputError(f"{path} holds no text to calibrate the hot-expert cache on")
        step = min(self.plan.chunk_tokens, self.plan.kv_tokens)
        resident = self.calibrate_hot_experts([ids[i:i + step] for i in range(0, len(ids), step)])
        write_json_atomic(self._heat_path(), {"counts": self.runtime.hcs.heat().tolist(), "source": str(path),
                                              "tokens": len(ids)})
        log.info("hot-expert heat map from %s (%d tokens) saved to %s", path, len(ids), self._heat_path())
        return resident

    def _open_gguf_experts(self, gguf_path: str | Path, expert_bits: int):
        """The GGUF's routed experts as a GgufExpertStore (indexed by MoE layer), recorded in the load report."""
        from .gguf_experts import read_gguf_experts

        if expert_bits != 16:
            raise ValueError(f"expert_bits={expert_bits} was given with gguf_path: the GGUF's own types set the "
                             "CPU expert format; leave expert_bits at its default (the GPU engine's experts take "
                             "quant.gpu_expert_bits)")
        experts = read_gguf_experts(gguf_path, self.spec, self.config)
        self.gguf_experts = experts
        self.expert_bits = round(experts.bits_per_weight)
        self.load_report["gguf"] = {**experts.identity(), "types": experts.types,
                                    "bits_per_weight": experts.bits_per_weight}
        log.info("CPU experts: %d layers x %d experts from GGUF %s (%s, %.2f bits/weight), memory-mapped",
                 len(experts.moe_layers), experts.num_experts, experts.files[0], experts.types,
                 experts.bits_per_weight)
        return experts.open_store()

    def _gguf_cpu_weights(self, ckpt: Checkpoint, store) -> ModelWeights:
        """The CPU path with GGUF experts: every other weight in the compute dtype from the model."""
        from .engine.cpu_quant import CPUExpertLayer

        slots = {layer: slot for slot, layer in enumerate(self.gguf_experts.moe_layers)}
        return load_weights(ckpt, self.spec, self.dtype, self.device,
                            experts_factory=lambda index, _read: CPUExpertLayer(store, slots[index]))

    @torch.inference_mode()
    def warm_up(self, tokens: int = WARMUP_TOKENS) -> float:
        """Generate ``tokens`` greedy tokens after a short prompt (64 tokens, streamed through prefill), unused, so
        that a first request does not pay for what the GPU engine does once: compiling prefill's kernels, capturing
        the first KV bucket's decode graphs and ``auto``'s first trials of its shares. Within a smaller context
        both are shortened. Returns the seconds it took; 0.0 without the GPU engine (nothing to warm)."""
        if self.runtime is None:
            return 0.0
        room = min(self.max_context, self.plan.kv_tokens if self.plan is not None else self.max_context)
        # a prompt long enough to be streamed (prefill's kernels compiled too), both within a small context
        length = min(WARMUP_PROMPT_TOKENS, room // 2)
        tokens = min(tokens, room - length)
        if length < 1 or tokens < 1:
            return 0.0
        text = self.tokenizer.encode(WARMUP_TEXT, add_special_tokens=False) or [0]
        prompt = (text * (length // len(text) + 1))[:length]
        start, eos = time.perf_counter(), self.eos_token_ids
        self.eos_token_ids = set()  # every step wanted, wherever the model would stop
        try:
            self.generate(prompt, max_new_tokens=tokens)
        finally:
            self.eos_token_ids = eos
        self.runtime.hcs.reset_coverage()  # the coverage reported is the requests'
        seconds = time.perf_counter() - start
        log.info("warm-up: %d tokens generated and dropped in %.1f s (decode graphs captured, decode mode's shares "
                 "tried)", tokens, seconds)
        return seconds

    @torch.inference_mode()
    def calibrate_hot_experts(self, prompts: list[list[int]]) -> int:
        """Prefill each prompt (nothing generated) to collect routing statistics, then fill the hot-expert cache
        from them (after each prompt, as after any prefill); returns how many experts are resident. Decode keeps
        counting afterwards."""
        if self.runtime is None:
            raise InvalidInputError(NO_HOT_CACHE)
        for ids in prompts:
            self._prefill(self._check_tokens(ids), self.new_cache(), 0)
        self.runtime.hcs.install_copied(wait=True)  # the last refill's copies run in the background
        return sum(r is not None for r in self.runtime.hcs.resident)

    def engine_report(self) -> dict:
        """What the engine decided and measured: the VRAM plan, bytes moved per prefill pass and per decoded
        token, hot-cache coverage of decode since the last call (which resets it), peak VRAM."""
        report: dict = {"flops_per_token": matmul_flops_per_token(self.spec), "kv_dtype": self.kv_dtype,
                        **self.load_report}
        if self.plan is not None:
            report["vram_plan"] = self.plan.as_dict()
            report["prefill_chunk_tokens"] = self.plan.chunk_tokens
            if self.device.type == "cuda":
                report["vram_peak_reserved"] = torch.cuda.max_memory_reserved(self.device)
        if self.runtime is not None:
            rt, moe = self.runtime, self.spec.moe
            coverage = rt.hcs.coverage()
            report["expert_bytes_total"] = len(rt.host) * rt.nbytes_per_layer()
            report["hcs_slots"] = rt.hcs.slots
            report["hcs_coverage"] = coverage
            per_token = len(rt.host) * moe.router.top_k * rt.cpu_expert_nbytes
            report["cpu_expert_bytes_per_token"] = per_token * (1 - (coverage or 0.0))
            report["expert_bytes_streamed"] = rt.streamer.bytes_copied
            rt.hcs.reset_coverage()
        return report

    def engine_counters(self) -> dict:
        """Running totals of the hybrid engine since load (empty on the CPU path): decode layer steps, routed-expert
        calls and how many ran on the GPU, seconds in the CPU experts and waiting for the GPU, expert bytes
        streamed for prefill. The difference of two readings is what happened in between."""
        if self.runtime is None:
            return {}
        return {**self.runtime.counters, "expert_bytes_streamed": self.runtime.streamer.bytes_copied}

    def _check_tokens(self, token_ids: list[int], extra: int = 0) -> torch.Tensor:
        if len(token_ids) == 0:
            raise InvalidInputError("the prompt is empty; give at least one token")
        bad = [t for t in token_ids if not 0 <= int(t) < self.spec.vocab_size]
        if bad:
            raise InvalidInputError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size}); "
                                    "encode the prompt with this model's tokenizer (llm.tokenizer.encode)")
        if len(token_ids) + extra > self.max_context:
            raise InvalidInputError(f"the prompt has {len(token_ids)} tokens and {extra} more were asked for, "
                                    f"but the model's context is {self.max_context} tokens; shorten the prompt "
                                    "or ask for fewer new tokens")
        if self.plan is not None and len(token_ids) + extra > self.plan.kv_tokens:
            raise InvalidInputError(f"the prompt has {len(token_ids)} tokens and {extra} more were asked for, but "
                                    f"the KV cache holds {self.plan.kv_tokens} tokens; shorten the prompt, ask for "
                                    "fewer new tokens, or give the cache more memory (--kv-cache-mb, or a larger "
                                    "--vram-budget-mb)")
        return torch.tensor([int(t) for t in token_ids], dtype=torch.long, device=self.device)

    def new_cache(self) -> KVCache:
        """An empty KV cache. With decode graphs it is always the same cache (the graphs hold its addresses), so
        this ends the prefix-reuse session that held it, and a generation still decoding into it."""
        if self._kv is not None:
            self._session = None
            self._take_kv().reset()
            return self._kv
        return self._fresh_cache()

    @torch.inference_mode()
    def _quiesce(self) -> None:
        """Serve (unused) a step a paused pipelined generation left queued: the GPU side of a queued step waits
        for the host, so anything else the device runs would wait behind it."""
        if self._graphs is not None:
            self._graphs.discard()

    def _take_kv(self) -> KVCache:
        """The decode graphs' one cache, for a new owner (a generation still holding it finds it taken)."""
        self._quiesce()
        self._kv_owner += 1
        return self._kv

    def _check_owner(self, cache: KVCache, owner: int) -> None:
        """Raise if a later call took ``cache`` (the decode graphs' one cache) from the generation of ``owner``."""
        if cache is self._kv and self._kv_owner != owner:
            raise RuntimeError("this generation's KV cache was taken by a later call on the same model (with CUDA "
                               "graphs every generation decodes into one cache): finish or close a stream before "
                               "starting another, or pass cuda_graphs=False for independent generations")

    def _fresh_cache(self) -> KVCache:
        if self.plan is not None:
            return KVCache(self.spec, self.dtype, self.device, kv_dtype=self.kv_dtype, max_tokens=self.plan.kv_tokens)
        return KVCache(self.spec, self.dtype, self.device, kv_dtype=self.kv_dtype)

    def _prefill(self, tokens: torch.Tensor, cache: KVCache, start: int, on_hidden=None,
                 end: bool = True) -> torch.Tensor:
        """Run the prompt tokens [start:] in chunks of the VRAM plan's size; returns the last position's
        hidden state [1, hidden]; ``on_hidden(hidden)`` sees every chunk's hidden states. ``end``: let the GPU
        engine refresh its hot-expert cache now (otherwise the caller does, before decoding)."""
        chunk = self.plan.chunk_tokens if self.plan is not None else len(tokens)
        hidden = None
        for first in range(start, len(tokens), chunk):
            hidden = self._forward(tokens[first:first + chunk], cache, first)
            if on_hidden is not None:
                on_hidden(hidden)
        if end and self.runtime is not None:
            self.runtime.end_prefill()
        return hidden[-1:]

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits for every position of the prompt: float32 [len(token_ids), vocab]."""
        tokens = self._check_tokens(token_ids)
        out: list[torch.Tensor] = []

        def collect(hidden: torch.Tensor) -> None:
            # a few rows at a time: [chunk, vocab] logits would not fit a small VRAM budget
            for rows in hidden.split(LOGIT_ROWS):
                out.append(self._forward.logits(rows).float().cpu())

        self._prefill(tokens, self.new_cache(), 0, collect)
        return torch.cat(out)

    @torch.inference_mode()
    def stream(self, token_ids: list[int], max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, reuse_prefix: bool = False, min_p: float = 0.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Iterator[int]:
        """New token ids one at a time; stops after an EOS token or ``max_new_tokens``.

        ``min_p``, ``presence_penalty`` and ``frequency_penalty`` are OpenAI's / llama.cpp's (0 = off); the
        penalties count the tokens generated in this call.

        With ``reuse_prefix`` the KV cache of the previous ``reuse_prefix`` call is kept and only the tokens after
        the longest common prefix are prefilled (agents resend the whole conversation each turn);
        ``last_cached_tokens`` then says how many prompt tokens came from the cache. Models with linear-attention
        layers (Qwen3-Next) reuse only when the common prefix covers everything cached or at least the previous
        prompt (their recurrent state is kept at both points), and otherwise prefill the whole prompt.
        """
        tokens = self._check_tokens(token_ids, max_new_tokens)
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        if reuse_prefix and self._session is not None:
            cache, cached = self._session
            if cache is self._kv:
                self._take_kv()
            # linear-attention state cannot be rewound: truncate may keep less (see KVCache.truncate)
            start = cache.truncate(_common_prefix(cached, token_ids, limit=len(token_ids) - 1))
        else:
            cache, start = self.new_cache(), 0
        self.last_cached_tokens = start
        owner = self._kv_owner  # this generation's claim on the decode graphs' cache (``_check_owner``)
        history = list(token_ids)
        if reuse_prefix:
            self._session = (cache, history)
        hidden = self._prefill(tokens, cache, start, end=False)
        if reuse_prefix:
            cache.snapshot()  # linear-attention state at the prompt's end, for the next call's prefix reuse
        counts = None
        if presence_penalty or frequency_penalty:
            counts = torch.zeros(self.spec.vocab_size, dtype=torch.float32, device=self.device)
        logits = self._forward.logits(hidden[-1:])[0]
        if temperature <= 0 and counts is None and self._pipelined(cache):
            yield from self._greedy_pipelined(logits, cache, history, max_new_tokens, owner)
            return
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, top_k, generator, min_p=min_p,
                           presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, counts=counts)
            if step == 0 and self.runtime is not None:
                # the hot cache's refill (copies queued on the stream) after the first token, not before it
                self.runtime.end_prefill()
            if counts is not None:
                counts[token] += 1
            yield token
            if token in self.eos_token_ids or step == max_new_tokens - 1:
                return
            history.append(token)
            self._check_owner(cache, owner)
            logits = self._decode_step(token, cache)

    def _pipelined(self, cache: KVCache) -> bool:
        """Whether greedy decode into ``cache`` launches each step before the host has seen the previous token."""
        return (self.pipeline_decode and self._graphs is not None and cache is self._kv
                and self._graphs.pipeline_unsupported() is None)

    def _greedy_pipelined(self, logits: torch.Tensor, cache: KVCache, history: list[int],
                          max_new_tokens: int, owner: int) -> Iterator[int]:
        """Greedy decode with each step queued on the device's token as soon as the previous step's CPU experts
        are done: the GPU goes from one step's end into the next while the host reads the token back and hands it
        out. A step queued on a token that turns out to end the generation (EOS, or the caller stops) still runs
        to its end, unused."""
        g = self._graphs
        token = sample(logits, 0.0, 1.0, 0, None)
        self.runtime.end_prefill()  # the hot cache's refill after the first token, as in ``stream``
        g.set_token(token)
        ticket = None  # the queued step on ``token`` not yet served
        try:
            for step in range(max_new_tokens):
                last = step == max_new_tokens - 1
                if not last and ticket is None and token not in self.eos_token_ids:
                    ticket = g.launch(cache.length)
                handed = time.perf_counter()
                yield token
                if token in self.eos_token_ids or last:
                    return
                history.append(token)
                self._check_owner(cache, owner)
                if ticket is not None and (not g.queued(ticket) or time.perf_counter() - handed > PIPELINE_PAUSE_S):
                    # the caller held the token long enough for the queued step's GPU side to stop waiting for
                    # the host, or meanwhile changed a decode setting (which served the step): run it again, from
                    # the token
                    g.discard(ticket)
                    g.set_token(token)
                    g.launch(cache.length)
                ticket = None  # served below, or failed (a failure resets the link)
                g.serve()
                if step + 2 < max_new_tokens:  # the token the served step chose is not the last one asked for
                    ticket = g.launch(cache.length)
                token = g.chosen()
        finally:
            if ticket is not None:
                g.discard(ticket)

    def _decode_step(self, token: int, cache: KVCache) -> torch.Tensor:
        """Logits [vocab] after appending ``token`` to ``cache``."""
        if self._graphs is not None and cache is self._kv:
            return self._graphs.step(token, cache.length)[0]
        next_input = torch.tensor([token], dtype=torch.long, device=self.device)
        return self._forward.logits(self._forward(next_input, cache, cache.length))[0]

    def generate(self, token_ids: list[int], max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None) -> list[int]:
        """New token ids only (the EOS token included when generation stopped on it)."""
        return list(self.stream(token_ids, max_new_tokens, temperature, top_p, top_k, seed))
