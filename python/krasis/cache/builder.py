"""Building a cache: every part written atomically with a checksum sidecar (so a killed build resumes where it
stopped), the manifest last; an existing cache is checked (sizes always, checksums on request) and any
missing, truncated or mismatched part is reported and rebuilt, never used."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import Checkpoint
from ..models.spec import ArchSpec
from ..paths import cache_dir
from .files import check_free_space, sha256_file, write_json_atomic
from .key import FORMAT_VERSION, cache_key, key_quant
from .parts import Part, cache_parts
from .quant_config import QuantConfig

log = logging.getLogger("krasis")

MANIFEST = "manifest.json"


def _sidecar(directory: Path, part: Part) -> Path:
    return directory / (part.rel + ".done")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _part_problem(directory: Path, rel: str, record: dict | None, verify: bool) -> str | None:
    """Why a finished part cannot be used, or None when it can."""
    path = directory / rel
    if record is None:
        return "has no record of being finished"
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"has {size} bytes, expected {record.get('size')} (truncated or overwritten)"
    if verify and sha256_file(path) != record.get("sha256"):
        return "does not match its checksum (corrupted)"
    return None


def _discard(directory: Path, part: Part, why: str) -> None:
    log.warning("cache part %s %s: rebuilding it", directory / part.rel, why)
    (directory / part.rel).unlink(missing_ok=True)
    _sidecar(directory, part).unlink(missing_ok=True)


def ensure_cache(ckpt: Checkpoint, spec: ArchSpec, quant: QuantConfig, verify: bool = False,
                 progress: bool = True, gpu_experts: bool = False,
                 cpu_experts_from: dict | None = None) -> tuple[Path, dict]:
    """The directory and manifest of a complete, checked cache for this model and config, building
    (or finishing, or repairing) it first when needed. ``gpu_experts``: the run needs the GPU engine's own
    expert files (built only then, at ``quant.gpu_expert_bits``; files of other widths stay in the cache).
    ``cpu_experts_from``: the identity of a GGUF that supplies the CPU experts (no CPU expert files are built; the
    key records it)."""
    cpu_experts = cpu_experts_from is None
    directory = cache_dir() / cache_key(ckpt, quant, cpu_experts_from)
    parts = list(cache_parts(ckpt, spec, quant, gpu_experts, cpu_experts))
    wanted = {p.rel for p in parts}
    manifest = _read_json(directory / MANIFEST)
    listed = manifest.get("files", {}) if manifest is not None else {}
    # GPU expert files of another width (or not needed by this run) stay as they are, listed for the runs
    # that need them; anything else the manifest lists but this config does not make means a stale manifest.
    kept = {rel: rec for rel, rec in listed.items() if rel not in wanted and rec.get("kind") == "gpu_experts"}
    if manifest is not None and not set(listed) - set(kept) <= wanted:
        log.warning("cache manifest %s lists files this model's cache does not have: rebuilding",
                    directory / MANIFEST)
        manifest, listed, kept = None, {}, {}
    # A part the manifest lists is checked on its size (checksum with verify); any other finished part (no
    # manifest yet, or a part this run adds) is checked against its sidecar's checksum before it is trusted.
    records = {p.rel: listed[p.rel] if p.rel in listed else _read_json(_sidecar(directory, p)) for p in parts}
    todo = []
    for part in parts:
        if not (directory / part.rel).exists() and records.get(part.rel) is None:
            todo.append(part)
            continue
        why = _part_problem(directory, part.rel, records.get(part.rel), verify or part.rel not in listed)
        if why:
            _discard(directory, part, why)
            todo.append(part)
    if manifest is not None and not todo and wanted <= set(listed):
        return directory, manifest
    (directory / MANIFEST).unlink(missing_ok=True)
    if todo:
        _build(directory, todo, progress)
    files = {p.rel: {"kind": p.kind, "layer": p.layer, **_read_json(_sidecar(directory, p))} for p in parts}
    manifest = {"format_version": FORMAT_VERSION, "model_dir": str(ckpt.model_dir), "family": spec.family,
                "quant": key_quant(quant), "cpu_experts_from": cpu_experts_from,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": {**kept, **files}}
    write_json_atomic(directory / MANIFEST, manifest)
    return directory, manifest


def _build(directory: Path, todo: list[Part], progress: bool) -> None:
    needed = sum(p.estimated_size for p in todo)
    check_free_space(directory, needed)
    total = sum(p.source_bytes for p in todo)
    log.info("building %d cache parts in %s (%.2f GB of weights in, about %.2f GB out)", len(todo), directory,
             total / 1e9, needed / 1e9)
    start = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="krasis: building weight cache",
              disable=not progress) as bar:
        for part in todo:
            path = directory / part.rel
            digest = part.write(path)
            write_json_atomic(_sidecar(directory, part), {"size": path.stat().st_size, "sha256": digest})
            bar.update(part.source_bytes)
    elapsed = time.perf_counter() - start
    log.info("cache built in %.1f s (%.2f GB/s of source weights)", elapsed, total / 1e9 / max(elapsed, 1e-9))
