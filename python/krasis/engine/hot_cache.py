"""The hot-expert cache (HCS): a fixed number of VRAM slots holding the routed experts that routing statistics
say are used most, so decode runs them on the GPU instead of reading them from DRAM on the CPU.

Prefill's two expert streaming buffers are idle between prompts, so the cache may be given them too (``lendable``
slots of its storage): they hold hot experts during decode and are handed back, emptied, before a prompt streams
experts through them (``lend``). So is the memory prefill's activations take while a prompt runs (``extra_slots``):
allocated after a prompt in chunks the decode kernels find through an address table (``moe_gemv``'s ``extra``),
freed before the next prompt streams."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..kernels import GPUExperts, copy_experts, empty_experts
from ..kernels.moe_decode import extra_slot_addresses
from .device_sync import fork, new_event, on_stream, side_stream

log = logging.getLogger("krasis")
# A refill after a prompt happens when at least this share of the slots would change hands.
REFILL_MIN_CHANGE = 0.05
# During decode, every UPDATE_EVERY steps the counts so far are multiplied by UPDATE_DECAY (so recent routing
# outweighs old) and at most UPDATE_SWAPS of the coldest resident experts are replaced by hotter ones, copied in
# the background (see ``update_between_steps``).
UPDATE_EVERY = 64
UPDATE_DECAY = 0.9
UPDATE_SWAPS = 8
# The recency tail: this share of the slots goes to the most recently routed experts outside the hottest
# (routing follows the text, so an expert just used is likely again soon, before its count shows it).
RECENT_SHARE = 1 / 16
# Extra slots are allocated this many at a time (one allocation the allocator may refuse without losing the rest).
EXTRA_CHUNK = 16
# A refill in the background installs its newcomers this many at a time, each batch once its copies have landed.
REFILL_BATCH = 32


class HotExpertCache:
    """Slots [S] of experts in VRAM, the (layer slot, expert) -> VRAM slot tables on GPU and host, and the
    routing counts that choose what is resident."""

    def __init__(self, host: list[GPUExperts], slots: int, device: torch.device, storage: GPUExperts | None = None,
                 lendable: Sequence[int] | None = None, extra_slots: int = 0):
        """``slots`` always usable; with ``storage`` (GPUExperts holding at least those first) the slots
        ``lendable`` of it are usable while lent (from the start, until ``lend(False)``), and so are up to
        ``extra_slots`` more (numbered after the storage's), allocated when lent and freed when taken back."""
        self.host, self.device = host, device
        self.num_layers, self.num_experts = len(host), host[0].num_experts if host else 0
        self.slots = min(slots, self.num_layers * self.num_experts)
        if storage is None:
            storage = empty_experts(host[0].layout, max(self.slots, 1), device) if host else None
        self.experts = storage
        self.stored = storage.num_experts if storage is not None else 0  # slots in ``experts``; extra ones follow
        self.extra = extra_slots if host else 0
        total = self.stored + self.extra
        self.usable = np.zeros(total, dtype=bool)  # slots that may hold an expert now
        self.usable[: self.slots] = True
        self.lendable = np.asarray(lendable if lendable is not None else [], dtype=np.int64)
        self.lent = False
        self.capacity = self.slots + len(self.lendable) + self.extra  # the most slots ever usable
        # the extra slots' memory while lent (chunks of EXTRA_CHUNK), and the addresses the decode kernels read
        self._extra_parts: list[GPUExperts] = []
        self._short = False  # whether the allocator has refused an extra chunk (said once in the log)
        self.extra_table = torch.zeros((self.extra, 4), dtype=torch.int64, device=device) if self.extra else None
        self.table_host = np.full((self.num_layers, self.num_experts), -1, dtype=np.int64)
        self.table = torch.full((self.num_layers, self.num_experts), -1, dtype=torch.int32, device=device)
        self.resident: list[tuple[int, int] | None] = [None] * total
        self.counts = np.zeros((self.num_layers, self.num_experts), dtype=np.float64)
        # the decode call count (``decode_calls``) at each (layer, expert)'s last routing; -1: never in decode
        self.last_used = np.full((self.num_layers, self.num_experts), -1, dtype=np.int64)
        self._gpu_counts = torch.zeros((self.num_layers, self.num_experts), dtype=torch.float64, device=device)
        self.decode_calls = 0
        self.decode_hits = 0
        self.updates = self.swaps = 0  # between-step updates since load, and the experts they swapped in
        self.version = 0  # bumped whenever the resident set changes
        self._copy_stream = side_stream(device)
        # copies in flight on ``_copy_stream``: batches of (slot, (layer, expert)), each with the event after its copies
        self._incoming: list[tuple[list[tuple[int, tuple[int, int]]], object]] = []
        self.lend(True)

    def lend(self, on: bool) -> int:
        """Make the lendable and extra slots usable (``on``; the extra ones as far as the allocator gives their
        memory) or take them back: their experts leave the tables (queued on the current stream, so work queued
        before still reads them), the extra slots' memory is freed, and nothing is copied into them until lent
        again. Returns the slots added (on) or emptied (off)."""
        if not (len(self.lendable) or self.extra) or on == self.lent:
            return 0
        self.lent = on
        if on:
            self.usable[self.lendable] = True
            extra = self._allocate_extra()
            self.usable[self.stored: self.stored + extra] = True
            changed = len(self.lendable) + extra
        else:
            self.install_copied(wait=True)  # a background refill or update may be copying into these slots
            taken = np.concatenate([self.lendable, np.arange(self.stored, self.stored + self.extra)])
            out = [(int(s), None) for s in taken if self.resident[s] is not None]
            self._evict(out)
            self.usable[taken] = False
            if out:
                self._publish()
            # freed on the current stream, after the table update queued above: memory reused from here on is
            # written only after the work that could still read these slots
            self._extra_parts = []
            changed = len(out)
        self.slots = int(self.usable.sum())
        return changed

    def _allocate_extra(self) -> int:
        """Allocate the extra slots' memory, EXTRA_CHUNK slots at a time until all have it or the allocator refuses
        (the VRAM cap reached), and write their addresses to ``extra_table``; returns the slots allocated."""
        rows = []
        while len(rows) * EXTRA_CHUNK < self.extra:
            count = min(EXTRA_CHUNK, self.extra - len(rows) * EXTRA_CHUNK)
            try:
                part = empty_experts(self.host[0].layout, count, self.device)
            except torch.OutOfMemoryError:
                break
            self._extra_parts.append(part)
            rows.append(extra_slot_addresses(part))
        if not rows:
            return 0
        table = torch.cat(rows)
        self.extra_table[: len(table)].copy_(table)
        if len(table) < self.extra:
            log.log(logging.DEBUG if self._short else logging.INFO, "hot-expert cache: %d of %d extra slots "
                    "allocated (the VRAM cap reached)", len(table), self.extra)
            self._short = True
        return len(table)

    def _slot(self, s: int) -> GPUExperts:
        """Slot ``s`` as a one-expert view of the storage or of its extra chunk."""
        if s < self.stored:
            return self.experts.slice(s, s + 1)
        chunk, at = divmod(s - self.stored, EXTRA_CHUNK)
        return self._extra_parts[chunk].slice(at, at + 1)

    def record_gpu(self, layer: int, ids: torch.Tensor) -> None:
        """Count routing decisions held on the GPU (prefill), without synchronising."""
        self._gpu_counts[layer] += torch.bincount(ids.flatten(), minlength=self.num_experts).to(torch.float64)

    def record_step(self, layers: list[int], ids: np.ndarray) -> int:
        """Count routing decisions of decode held on the host: row j of ``ids`` [len(layers), k] was routed in MoE
        layer ``layers[j]``; returns how many of them were resident (served from VRAM)."""
        rows = np.repeat(np.asarray(layers, dtype=np.int64), ids.shape[1])
        np.add.at(self.counts, (rows, ids.ravel()), 1.0)
        hits = int((self.table_host[rows, ids.ravel()] >= 0).sum())
        self.decode_calls += ids.size
        self.last_used[rows, ids.ravel()] = self.decode_calls
        self.decode_hits += hits
        return hits

    def heat(self) -> np.ndarray:
        """Routing counts per (MoE layer, expert) seen so far, float64 [layers, experts] (prefill and decode)."""
        return self.counts + self._gpu_counts.cpu().numpy()

    def add_heat(self, heat: np.ndarray) -> int:
        """Add counts gathered elsewhere (a saved heat map) and refill; returns the slots (re)filled."""
        if heat.shape != self.counts.shape:
            raise ValueError(f"heat map of shape {heat.shape} for a model with {self.counts.shape} (layers, experts)")
        self.counts += heat
        return self.refill()

    def decay(self, factor: float) -> None:
        """Multiply every routing count so far by ``factor`` (later routing then weighs more)."""
        self.counts *= factor
        self._gpu_counts *= factor

    def coverage(self) -> float | None:
        """Share of decode routed-expert calls served from VRAM since the last reset (None before any)."""
        return self.decode_hits / self.decode_calls if self.decode_calls else None

    def reset_coverage(self) -> None:
        self.decode_calls = self.decode_hits = 0

    def wanted(self, counts: np.ndarray) -> np.ndarray:
        """The flat (layer * E + expert) indices that should be resident: the most used by ``counts``, hottest
        first, then the recency tail (RECENT_SHARE of the slots): the most recently routed in decode of the rest,
        the more used first among equals."""
        order = np.argsort(-counts, axis=None, kind="stable")
        tail = int(self.slots * RECENT_SHARE)
        head = order[: self.slots - tail]
        if not tail:
            return head
        rest = order[self.slots - tail:]
        recent = rest[np.argsort(-self.last_used.ravel()[rest], kind="stable")[:tail]]
        return np.concatenate([head, recent])

    def _plan(self, counts: np.ndarray, max_swaps: int | None) -> list[tuple[int, tuple[int, int]]]:
        """(slot, newcomer) pairs that make the wanted experts resident: free slots first, then the residents no
        longer wanted, coldest first; with ``max_swaps`` at most that many newcomers, in ``wanted``'s order. Empty
        after a prompt (no ``max_swaps``) when fewer than REFILL_MIN_CHANGE of the slots would change."""
        wanted = [(int(i) // self.num_experts, int(i) % self.num_experts) for i in self.wanted(counts)]
        wanted_set = set(wanted)
        current = {r for r in self.resident if r is not None}
        incoming = [w for w in wanted if w not in current]
        if max_swaps is None:
            if len(incoming) < REFILL_MIN_CHANGE * self.slots and len(current) == self.slots:
                return []
        else:
            incoming = incoming[:max_swaps]
        free = sorted((s for s, r in enumerate(self.resident) if self.usable[s] and (r is None or r not in wanted_set)),
                      key=lambda s: -1.0 if self.resident[s] is None else counts[self.resident[s]])
        return list(zip(free, incoming, strict=False))

    def _evict(self, plan: list[tuple[int, tuple[int, int]]]) -> None:
        """Take the current residents of the plan's slots out of the host table."""
        for s, _ in plan:
            if self.resident[s] is not None:
                self.table_host[self.resident[s]] = -1
            self.resident[s] = None

    def _copy_in(self, plan: list[tuple[int, tuple[int, int]]]) -> None:
        """Queue the copies of the plan's newcomers into their slots on the current stream."""
        for s, (layer, expert) in plan:
            copy_experts(self._slot(s), self.host[layer].slice(expert, expert + 1))

    def _install(self, plan: list[tuple[int, tuple[int, int]]]) -> None:
        """Make the plan's newcomers resident in both tables (the GPU's queued on the current stream)."""
        for s, (layer, expert) in plan:
            self.resident[s] = (layer, expert)
            self.table_host[layer, expert] = s
        self._publish()

    def _publish(self) -> None:
        """Queue the host table's copy to the GPU's on the current stream; the resident set has changed."""
        self.table.copy_(torch.from_numpy(self.table_host).to(torch.int32))
        self.version += 1

    def refill(self, max_swaps: int | None = None, background: bool = False) -> int:
        """Make the most-used experts resident; returns how many slots were (re)filled. With ``max_swaps``
        (between decode steps) at most that many of the coldest residents are replaced, by the hottest
        non-resident experts, and even one swap is made; without it (after a prompt) everything that should be
        resident is loaded, when at least REFILL_MIN_CHANGE of the slots would change.

        The copies and the table update are queued on the current stream, so decode steps queued before them
        read the old contents and steps after them the new; the host table changes at the same point, so the
        host's and the GPU's view of what is resident always agree at a step's start. With ``background`` the
        outgoing experts leave the tables at once and the newcomers are copied behind the current stream's work
        (``install_copied`` adds them, hottest first, as their copies land)."""
        if self.slots == 0:
            return 0
        self.install_copied(wait=True)
        counts = self.heat()
        if not counts.any():
            return 0
        plan = self._plan(counts, max_swaps)
        if not plan:
            return 0
        self._evict(plan)
        if background:
            self._publish()
            self._copy_behind(plan)
        else:
            self._copy_in(plan)
            self._install(plan)
        held = self.table_host >= 0
        for _, newcomer in plan:
            held[newcomer] = True
        log.log(logging.INFO if max_swaps is None else logging.DEBUG,
                "hot-expert cache: %d of %d slots refilled%s; the resident experts took %.1f%% of the routed calls "
                "seen so far%s", len(plan), self.slots, " in the background" if background else "",
                100 * counts[held].sum() / counts.sum(), "" if max_swaps is None else " (decayed)")
        return len(plan)

    def update_between_steps(self) -> int:
        """During decode (every UPDATE_EVERY steps): decay the counts and start swapping in at most UPDATE_SWAPS
        hotter experts; returns the swaps started (0 while earlier copies are still in flight).

        Nothing waits for the copies: the outgoing experts leave the tables at once (queued on the current stream,
        so steps queued before still read them, and the host sends them to the CPU from the next step on), the
        newcomers are copied on a side stream that waits for the work queued so far, and ``install_copied`` (at
        the start of each decode step) adds them to the tables once the copies have landed."""
        self.install_copied()
        if self._incoming or self.slots == 0:
            return 0
        self.decay(UPDATE_DECAY)
        plan = self._plan(self.heat(), UPDATE_SWAPS)
        self.updates += 1
        if not plan:
            return 0
        self._evict(plan)
        self._publish()
        self._copy_behind(plan)
        self.swaps += len(plan)
        return len(plan)

    def _copy_behind(self, plan: list[tuple[int, tuple[int, int]]]) -> None:
        """Copy the plan's newcomers on the side stream, after the work queued so far, in batches of REFILL_BATCH
        (each with an event after its copies) for ``install_copied``."""
        stream = self._copy_stream
        fork(stream, self.device)
        with on_stream(stream):
            for start in range(0, len(plan), REFILL_BATCH):
                batch = plan[start: start + REFILL_BATCH]
                self._copy_in(batch)
                copied = new_event(self.device)
                copied.record(stream)
                self._incoming.append((batch, copied))

    @property
    def copying(self) -> bool:
        """Whether background copies (a refill after a prompt, a between-step update) are queued and not yet
        installed: they share PCIe and host DRAM with the decode steps meanwhile."""
        return bool(self._incoming)

    def install_copied(self, wait: bool = False) -> int:
        """Add the experts whose background copies have landed to the tables (queued on the current stream); with
        ``wait``, wait for all of them first. Returns how many were added."""
        added = []
        while self._incoming:
            batch, copied = self._incoming[0]
            if wait:
                copied.synchronize()
            elif not copied.query():
                break
            added += batch
            self._incoming.pop(0)
        if added:
            self._install(added)
        return len(added)
