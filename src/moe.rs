//! The fused routed-expert forward: for M tokens and their top-k experts,
//! y[t] = sum_j w[t, j] * down_e( silu(gate_e x[t]) * up_e x[t] ),  e = ids[t, j].
//!
//! Two steps on the pool, each a barrier:
//! 1. gate/up: the rows of every expert in use, in chunks of 32, queued for the workers of the
//!    expert's NUMA node (on one node: each worker takes its own share of every expert's rows first,
//!    `HomeQueue`, so what `warm` read ahead for it is in its caches); each row is computed for all
//!    tokens routed to that expert. With INT8
//!    activations, the worker that completes a group of h (the down projection's activation group)
//!    also quantises it, so h needs no pass of its own.
//! 2. down: the H output rows in chunks of 32, queued for each node's workers (one node: own share
//!    first, as above); a chunk loops over
//!    that node's experts, summing weight * row . h into its rows of y. With several nodes each node
//!    sums into its own partial y, added at the end.
//!
//! At M = 1 the weights take tens of microseconds to stream, so the fixed cost of a call matters:
//! the buffers of a call are kept for the next on the calling thread (`Scratch`), and the workers
//! find their work by arithmetic on small per-call tables instead of materialised lists.

use crate::kernels::{row_tiles, weight_row_dot, WeightRef, MAX_TOKENS, ROW_TILE};
use crate::matmul::quantize_acts_into;
use crate::numa::order_by_node;
use crate::pool::{split_range, Disjoint, HomeQueue, Pool, WorkQueue};
use crate::quant::{quantize_act, ActRef, ActSlices, QuantActs};
use crate::simd::SimdPath;
use crate::store::check_forward_args;
use crate::warm::warm;
use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// One expert's three matrices (Krasis INT4/INT8 or GGUF blocks) and the NUMA node its memory is on.
#[derive(Clone, Copy)]
pub struct ExpertRef<'a> {
    pub gate: WeightRef<'a>,
    pub up: WeightRef<'a>,
    pub down: WeightRef<'a>,
    pub node: usize,
}

/// A (token, expert) pair of this call: its token, routing weight and index in `ids`.
#[derive(Clone, Copy, Default)]
struct Pair {
    t: usize,
    w: f32,
    p: usize,
}

/// An expert in use in this call, the node whose workers run it, and its pairs
/// (`Scratch::pairs[pairs]`, in the order of `ids`).
struct Slot<'a> {
    expert: ExpertRef<'a>,
    node: usize,
    pairs: Range<usize>,
}

/// Nanoseconds spent in each step of `moe_forward` since the last `take_phase_times` (setup and
/// activation quantisation, gate/up with h and its quantisation, down, total): a cheap profile for
/// benchmarks.
static PHASE_NS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Read and reset the per-step times (seconds) and the number of calls.
pub fn take_phase_times() -> ([f64; 4], u64) {
    let mut out = [0f64; 4];
    for (o, a) in out.iter_mut().zip(&PHASE_NS) {
        *o = a.swap(0, Ordering::Relaxed) as f64 * 1e-9;
    }
    (out, CALLS.swap(0, Ordering::Relaxed))
}
static CALLS: AtomicU64 = AtomicU64::new(0);

fn lap(i: usize, t: &mut Instant) {
    let now = Instant::now();
    PHASE_NS[i].fetch_add((now - *t).as_nanos() as u64, Ordering::Relaxed);
    *t = now;
}

/// Gate/up rows per unit of work taken from a queue.
pub const CHUNK_ROWS: usize = 32;
/// Down (output) rows per unit of work. Each unit visits every expert of its node, each visit a
/// new stream of weights; 32 rows measured as fast as 64 on the Qwen3-30B-A3B shape and 4% faster
/// on DeepSeek-V2-Lite's (more units to share out at M = 1), 16 slower.
pub const DOWN_CHUNK_ROWS: usize = 32;

/// Rows per kernel call for an expert with `pairs` pairs: as many as fill the output buffer of
/// MAX_TOKENS * ROW_TILE for its widest token block. With one pair (M = 1) a chunk of rows is one
/// call (fewer calls, each a longer stream); from MAX_TOKENS pairs on, ROW_TILE rows stay in
/// L1/L2 while every token block passes over them.
fn tile_rows(pairs: usize) -> usize {
    MAX_TOKENS * ROW_TILE / pairs.clamp(1, MAX_TOKENS)
}

/// Piece `c` of a run of items of `rows` rows each, cut into pieces of at most `size` rows:
/// (item, its rows). Pieces 0..items * rows.div_ceil(size) cover every (item, row) once.
fn piece(c: usize, rows: usize, size: usize) -> (usize, Range<usize>) {
    let per_item = rows.div_ceil(size);
    let start = (c % per_item) * size;
    (c / per_item, start..(start + size).min(rows))
}

/// On one NUMA node, the rows of a matrix of `rows` rows (cut in chunks of `chunk`) that worker `t` of
/// `workers` computes first in every call (its `HomeQueue` share): what `warm` reads ahead for it.
pub fn home_rows(rows: usize, chunk: usize, workers: usize, t: usize) -> Range<usize> {
    let c = split_range(rows.div_ceil(chunk), workers, t);
    (c.start * chunk).min(rows)..(c.end * chunk).min(rows)
}

/// A phase's work: shared by the workers of a node (several nodes), or each worker's own share first.
enum Queue {
    Any(WorkQueue),
    Home(HomeQueue),
}

impl Queue {
    fn take(&self, tid: usize) -> Option<usize> {
        match self {
            Queue::Any(q) => q.take(),
            Queue::Home(q) => q.take(tid),
        }
    }
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// Marks a (token, expert) pair that this call skips (computed elsewhere, e.g. on the GPU).
pub const SKIP: usize = usize::MAX;

/// The NUMA nodes whose queues `moe_forward` splits its work between: the pool's with `numa`, else one (and
/// then each worker takes its own share first: `HomeQueue`, what `warm` reads ahead).
pub fn forward_nodes(pool: &Pool, numa: bool) -> usize {
    if numa {
        pool.num_nodes()
    } else {
        1
    }
}

/// A store of routed experts whose layers `moe_forward` runs (Krasis INT4/INT8, GGUF blocks).
pub trait RoutedExperts {
    /// (hidden, intermediate, experts per layer).
    fn sizes(&self) -> (usize, usize, usize);

    /// Views of expert `expert` of `layer`; an error names an index out of range.
    fn expert_ref(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, String>;

    /// Whether the forward places work by the experts' NUMA nodes (`forward_nodes`).
    fn numa_placed(&self) -> bool;

    /// The routed-expert forward of `layer`, adding y to `out` ([M, H]): x [M, H], ids and
    /// weights [M, k] (ids SKIP where a pair is skipped).
    #[allow(clippy::too_many_arguments)]
    fn forward_add(
        &self,
        pool: &Pool,
        path: SimdPath,
        layer: usize,
        x: &[f32],
        ids: &[usize],
        weights: &[f32],
        act_int8: bool,
        out: &mut [f32],
    ) -> Result<(), String> {
        self.expert_ref(layer, 0)?;
        let (hidden, inter, experts) = self.sizes();
        check_forward_args(hidden, experts, x, ids, weights, out)?;
        let get = |e: usize| self.expert_ref(layer, e).expect("expert id checked above");
        moe_forward(
            pool,
            path,
            &get,
            hidden,
            inter,
            x,
            ids,
            weights,
            act_int8,
            self.numa_placed(),
            out,
        );
        Ok(())
    }

    /// The routed-expert forward of `layer`: x [M, H], ids/weights [M, k] -> y [M, H].
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        pool: &Pool,
        path: SimdPath,
        layer: usize,
        x: &[f32],
        ids: &[usize],
        weights: &[f32],
        act_int8: bool,
    ) -> Result<Vec<f32>, String> {
        let mut y = vec![0f32; x.len()];
        self.forward_add(pool, path, layer, x, ids, weights, act_int8, &mut y)?;
        Ok(y)
    }

    /// Read the weights of experts `ids` of `layer` into the CPU caches for the next forward, until `stop()`
    /// (`warm::warm`, reading each worker's share as the forward places it); returns the bytes read. Ids out
    /// of range are left out.
    fn read_ahead(
        &self,
        pool: &Pool,
        layer: usize,
        ids: &[usize],
        stop: &(dyn Fn() -> bool + Sync),
    ) -> usize {
        let experts: Vec<ExpertRef> = ids
            .iter()
            .filter_map(|&e| self.expert_ref(layer, e).ok())
            .collect();
        warm(pool, &experts, self.numa_placed(), stop)
    }
}

/// An expert id without a slot in `Scratch::slot_of`.
const NO_SLOT: usize = usize::MAX;

/// The buffers of a call, kept for the next call on the same thread: on a machine whose cores
/// stream weights, each allocation and each first touch of memory is a cache miss, and zeroing
/// is work no one needs. Their contents are stale between calls, except `slot_of` (all NO_SLOT).
#[derive(Default)]
struct Scratch {
    /// The slot of each expert id in use (a table: a hash map costs more than the whole grouping
    /// at these sizes).
    slot_of: Vec<usize>,
    /// The pairs, grouped by slot.
    pairs: Vec<Pair>,
    /// Slot indices grouped by node, node n's at `by_node[node_start[n]..node_start[n + 1]]`.
    by_node: Vec<usize>,
    node_start: Vec<usize>,
    /// Each node's gate/up queue, then each node's down queue.
    queues: Vec<Queue>,
    /// INT8 mode: per (slot, group of h), the rows still to compute (see `gate_up`).
    pending: Vec<AtomicUsize>,
    xacts: QuantActs,
    /// [pairs, inter]: silu(gate x) * up x of each pair (a skipped pair's row is never read), and
    /// its quantised form.
    h: Vec<f32>,
    hacts: QuantActs,
    /// Several nodes: [nodes - 1, M, H], the sums of nodes 1.. (node 0 sums into the output).
    partial: Vec<f32>,
}

/// Scratch larger than this (bytes: a prefill batch's) is freed after the call rather than
/// kept: allocating it costs little next to such a call, and keeping it would hold the memory.
const KEEP_SCRATCH_BYTES: usize = 4 << 20;

impl Scratch {
    /// Bytes held by the buffers that grow with M.
    fn bytes(&self) -> usize {
        let acts = |a: &QuantActs| {
            a.hi.capacity() + a.lo.capacity() + 4 * (a.scales.capacity() + a.scaled_sums.capacity())
        };
        let f32s = self.h.capacity() + self.partial.capacity();
        let pairs = self.pairs.capacity() * std::mem::size_of::<Pair>();
        4 * f32s + acts(&self.xacts) + acts(&self.hacts) + pairs
    }
}

thread_local! {
    /// This thread's `Scratch`. A call takes it and puts it back, so one that panics leaves none
    /// behind (nor a half-reset `slot_of`).
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

/// One call's work as the workers see it.
struct Plan<'s, 'a> {
    path: SimdPath,
    slots: &'s [Slot<'a>],
    pairs: &'s [Pair],
    by_node: &'s [usize],
    node_start: &'s [usize],
    numa: bool,
    hidden: usize,
    inter: usize,
    act_int8: bool,
}

impl<'s> Plan<'s, '_> {
    /// The node whose queues worker `tid` takes work from.
    fn worker_node(&self, pool: &Pool, tid: usize) -> usize {
        if self.numa {
            pool.node_of(tid)
        } else {
            0
        }
    }
    /// The slots node `n` runs, in order of first use.
    fn node_slots(&self, n: usize) -> &'s [usize] {
        &self.by_node[self.node_start[n]..self.node_start[n + 1]]
    }
    fn pairs_of(&self, slot: &Slot) -> &'s [Pair] {
        &self.pairs[slot.pairs.clone()]
    }
}

/// The kernels' token arguments for a block of up to MAX_TOKENS rows of a [_, k] activation
/// matrix: the f32 rows and, quantised (INT8 mode), their tokens. Built on the stack where used.
struct BlockArgs<'s> {
    rows: [&'s [f32]; MAX_TOKENS],
    acts: [ActRef<'s>; MAX_TOKENS],
    n: usize,
    quantised: bool,
}

const NO_ACTS: ActRef<'static> = ActRef {
    hi: &[],
    lo: &[],
    scales: &[],
    scaled_sums: &[],
};

impl<'s> BlockArgs<'s> {
    fn new(
        tokens: impl Iterator<Item = usize>,
        vals: &'s [f32],
        k: usize,
        acts: Option<&'s QuantActs>,
    ) -> Self {
        let mut b = BlockArgs {
            rows: [&[]; MAX_TOKENS],
            acts: [NO_ACTS; MAX_TOKENS],
            n: 0,
            quantised: acts.is_some(),
        };
        for i in tokens {
            b.rows[b.n] = &vals[i * k..(i + 1) * k];
            if let Some(a) = acts {
                b.acts[b.n] = a.token(i);
            }
            b.n += 1;
        }
        b
    }
    fn rows(&self) -> &[&'s [f32]] {
        &self.rows[..self.n]
    }
    fn acts(&self) -> &[ActRef<'s>] {
        &self.acts[..if self.quantised { self.n } else { 0 }]
    }
}

/// The routed-expert forward, adding y to `out` ([M, H]; zeros to get y itself). `x` is [M, H];
/// `ids` and `weights` are [M, k]; every id must be below the number of experts `expert(id)`
/// accepts, or SKIP (the pair adds nothing).
/// With `numa`, work follows `ExpertRef::node`. With `act_int8` the activations are quantised per
/// group (the weights' `int_group`: a Krasis matrix's group, 32 for GGUF blocks) for integer dots;
/// a GGUF type without an integer kernel (Q2_K, Q3_K) still takes them in f32.
#[allow(clippy::too_many_arguments)]
pub fn moe_forward<'a>(
    pool: &Pool,
    path: SimdPath,
    expert: &dyn Fn(usize) -> ExpertRef<'a>,
    hidden: usize,
    inter: usize,
    x: &[f32],
    ids: &[usize],
    weights: &[f32],
    act_int8: bool,
    numa: bool,
    out: &mut [f32],
) {
    assert_eq!(x.len() % hidden, 0, "x must be [M, hidden]");
    let m = x.len() / hidden;
    assert!(
        m > 0 && ids.len().is_multiple_of(m) && ids.len() == weights.len(),
        "ids and weights must be [M, k]"
    );
    assert_eq!(out.len(), x.len(), "out must be [M, hidden] like x");
    if ids.iter().all(|&e| e == SKIP) {
        return; // nothing to add (nor to pin the caller for)
    }
    let _pin = pool.pin_caller();
    let start = Instant::now();
    let mut t = start;
    let mut s = SCRATCH.take();
    let mut slots = group_pairs(&mut s, expert, ids, weights, ids.len() / m);
    let nodes = forward_nodes(pool, numa);
    for slot in &mut slots {
        if numa {
            slot.node = pool.serving_node(slot.expert.node % nodes);
        }
    }
    order_by_node(
        slots.iter().map(|s| s.node),
        nodes,
        &mut s.by_node,
        &mut s.node_start,
    );
    let act_int8 = act_int8
        && slots.iter().all(|s| {
            [s.expert.gate, s.expert.up, s.expert.down]
                .iter()
                .all(|w| w.int_group().is_some())
        });
    // INT8 mode quantises h per (pair, group of `hgroup` rows) as soon as it is complete.
    let hgroup = if act_int8 {
        slots[0].expert.down.int_group().expect("checked above")
    } else {
        inter
    };
    assert!(
        inter.is_multiple_of(hgroup),
        "expert intermediate size {inter} is not a multiple of the activation group {hgroup}"
    );
    if act_int8 {
        let group = slots[0].expert.gate.int_group().expect("checked above");
        quantize_acts_into(pool, x, hidden, group, &mut s.xacts);
        s.hacts.reshape(ids.len(), inter, hgroup);
        let n = slots.len() * (inter / hgroup);
        s.pending
            .resize_with(n.max(s.pending.len()), AtomicUsize::default);
        for rows_left in &mut s.pending[..n] {
            *rows_left.get_mut() = hgroup;
        }
    }
    s.h.resize(ids.len() * inter, 0.0);
    if nodes > 1 {
        s.partial.clear();
        s.partial.resize((nodes - 1) * m * hidden, 0.0);
    }
    {
        let plan = Plan {
            path,
            slots: &slots,
            pairs: &s.pairs,
            by_node: &s.by_node,
            node_start: &s.node_start,
            numa,
            hidden,
            inter,
            act_int8,
        };
        // Each node's queues: its slots' gate/up rows in chunks (`piece`), and, if it runs any
        // slot, the output rows in chunks. On one node each worker takes its own share of every
        // slot's rows first (`home_rows`: the same rows of whatever expert, call after call).
        s.queues.clear();
        let chunks_per_slot = inter.div_ceil(CHUNK_ROWS);
        let down_chunks = hidden.div_ceil(DOWN_CHUNK_ROWS);
        if nodes == 1 {
            let w = pool.num_threads();
            s.queues
                .push(Queue::Home(HomeQueue::new(w, slots.len(), chunks_per_slot)));
            s.queues
                .push(Queue::Home(HomeQueue::new(w, 1, down_chunks)));
        } else {
            s.queues.extend(
                (0..nodes).map(|n| {
                    Queue::Any(WorkQueue::new(plan.node_slots(n).len() * chunks_per_slot))
                }),
            );
            s.queues.extend((0..nodes).map(|n| {
                let runs_any = !plan.node_slots(n).is_empty();
                Queue::Any(WorkQueue::new(if runs_any { down_chunks } else { 0 }))
            }));
        }
        let (gate_queues, down_queues) = s.queues.split_at(nodes);
        let xacts = act_int8.then_some(&s.xacts);
        let hacts = act_int8.then_some(&mut s.hacts);

        lap(0, &mut t);
        gate_up(
            pool,
            &plan,
            gate_queues,
            x,
            xacts,
            &mut s.h,
            hacts,
            &s.pending,
        );
        lap(1, &mut t);
        let hacts = act_int8.then_some(&s.hacts);
        down(pool, &plan, down_queues, &s.h, hacts, out, &mut s.partial);
        lap(2, &mut t);
    }
    PHASE_NS[3].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    CALLS.fetch_add(1, Ordering::Relaxed);
    for part in s.partial[..(nodes - 1) * m * hidden].chunks_exact(m * hidden) {
        for (a, b) in out.iter_mut().zip(part) {
            *a += b;
        }
    }
    if s.bytes() <= KEEP_SCRATCH_BYTES {
        SCRATCH.set(s);
    }
}

/// Groups the (token, expert) pairs by expert into `s.pairs`: one slot per expert in use, in order
/// of first use, its pairs in the order of `ids` (`topk` per token).
fn group_pairs<'a>(
    s: &mut Scratch,
    expert: &dyn Fn(usize) -> ExpertRef<'a>,
    ids: &[usize],
    weights: &[f32],
    topk: usize,
) -> Vec<Slot<'a>> {
    // At most one slot per pair, and rarely more than a few hundred experts in all.
    let mut slots: Vec<Slot> = Vec::with_capacity(ids.len().min(256));
    // Count each slot's pairs (in `pairs.end` for now).
    for &e in ids.iter().filter(|&&e| e != SKIP) {
        if e >= s.slot_of.len() {
            s.slot_of.resize(e + 1, NO_SLOT);
        }
        if s.slot_of[e] == NO_SLOT {
            s.slot_of[e] = slots.len();
            slots.push(Slot {
                expert: expert(e),
                node: 0,
                pairs: 0..0,
            });
        }
        slots[s.slot_of[e]].pairs.end += 1;
    }
    // Give each slot its range of `s.pairs`, empty until filled below.
    let mut at = 0;
    for slot in &mut slots {
        let n = slot.pairs.end;
        slot.pairs = at..at;
        at += n;
    }
    s.pairs.clear();
    s.pairs.resize(at, Pair::default());
    for (p, &e) in ids.iter().enumerate().filter(|&(_, &e)| e != SKIP) {
        let slot = &mut slots[s.slot_of[e]];
        s.pairs[slot.pairs.end] = Pair {
            t: p / topk,
            w: weights[p],
            p,
        };
        slot.pairs.end += 1;
    }
    for &e in ids.iter().filter(|&&e| e != SKIP) {
        s.slot_of[e] = NO_SLOT;
    }
    slots
}

/// Step 1: h[p] = silu(gate x) * up x for every pair p and, with `hacts` (INT8 mode), its
/// quantised form. `pending[slot * hgroups + g]` counts the rows of group g of h still to compute
/// for the slot's pairs; the worker that completes a group quantises it, so h needs no pass (and
/// no barrier) of its own.
#[allow(clippy::too_many_arguments)]
fn gate_up(
    pool: &Pool,
    plan: &Plan,
    queues: &[Queue],
    x: &[f32],
    xacts: Option<&QuantActs>,
    h: &mut [f32],
    hacts: Option<&mut QuantActs>,
    pending: &[AtomicUsize],
) {
    let (path, inter, act_int8) = (plan.path, plan.inter, plan.act_int8);
    let hgroup = hacts.as_ref().map_or(inter, |q| q.group);
    let hgroups = inter / hgroup;
    let hd = Disjoint::new(h);
    let hqd = hacts.map(|q| {
        (
            Disjoint::new(&mut q.hi),
            Disjoint::new(&mut q.lo),
            Disjoint::new(&mut q.scales),
            Disjoint::new(&mut q.scaled_sums),
        )
    });
    pool.run(&|tid| {
        let (mut og, mut ou) = ([0f32; MAX_TOKENS * ROW_TILE], [0f32; MAX_TOKENS * ROW_TILE]);
        let node = plan.worker_node(pool, tid);
        let node_slots = plan.node_slots(node);
        while let Some(c) = queues[node].take(tid) {
            let (i, rows) = piece(c, inter, CHUNK_ROWS);
            let si = node_slots[i];
            let slot = &plan.slots[si];
            let (e, pairs) = (&slot.expert, plan.pairs_of(slot));
            for tile in row_tiles(rows.clone(), tile_rows(pairs.len())) {
                for block in pairs.chunks(MAX_TOKENS) {
                    let args = BlockArgs::new(block.iter().map(|q| q.t), x, plan.hidden, xacts);
                    let (ar, xs) = (args.acts(), args.rows());
                    weight_row_dot(path, &e.gate, tile.clone(), ar, xs, act_int8, &mut og);
                    weight_row_dot(path, &e.up, tile.clone(), ar, xs, act_int8, &mut ou);
                    let tb = block.len();
                    for (j, q) in block.iter().enumerate() {
                        let at = q.p * inter;
                        // SAFETY: rows `rows` of pair q.p belong to chunk c alone (a pair is in one
                        // slot, `piece` cuts the slot's rows into disjoint chunks), and the queue
                        // hands chunk c to one worker.
                        let hrow = unsafe { hd.range(at + tile.start..at + tile.end) };
                        // Token j's outputs: og[i * tb + j] for row i of the tile.
                        let (gs, us) = (og[j..].iter().step_by(tb), ou[j..].iter().step_by(tb));
                        for ((v, &g), &u) in hrow.iter_mut().zip(gs).zip(us) {
                            *v = silu(g) * u;
                        }
                    }
                }
            }
            let Some((hi, lo, sc, ss)) = &hqd else {
                continue;
            };
            for g in rows.start / hgroup..rows.end.div_ceil(hgroup) {
                let span = g * hgroup..(g + 1) * hgroup;
                let done = rows.end.min(span.end) - rows.start.max(span.start);
                // AcqRel: the worker that takes the count to zero sees every other worker's
                // rows of the group (they released them with their own decrement).
                if pending[si * hgroups + g].fetch_sub(done, Ordering::AcqRel) != done {
                    continue;
                }
                for q in pairs {
                    let (v, qi) = (q.p * inter + span.start, q.p * hgroups + g);
                    // SAFETY: group g of pair q.p is complete (its count reached zero here, once)
                    // and no other worker touches it or its quantised form in this phase.
                    unsafe {
                        quantize_act(
                            hd.range(v..v + hgroup),
                            hgroup,
                            ActSlices {
                                hi: hi.range(v..v + hgroup),
                                lo: lo.range(v..v + hgroup),
                                scales: sc.range(qi..qi + 1),
                                scaled_sums: ss.range(qi..qi + 1),
                            },
                        )
                    };
                }
            }
        }
    });
}

/// Step 2: y[t] += w * down h[p] for every pair p of token t and weight w, each node summing its
/// experts: node 0 into `out`, node n into part n - 1 of `partial`.
fn down(
    pool: &Pool,
    plan: &Plan,
    queues: &[Queue],
    h: &[f32],
    hacts: Option<&QuantActs>,
    out: &mut [f32],
    partial: &mut [f32],
) {
    let (path, hidden, inter) = (plan.path, plan.hidden, plan.inter);
    let m = out.len() / hidden;
    let (out_d, partial_d) = (Disjoint::new(out), Disjoint::new(partial));
    pool.run(&|tid| {
        let node = plan.worker_node(pool, tid);
        let (y, base) = match node {
            0 => (&out_d, 0),
            n => (&partial_d, (n - 1) * m * hidden),
        };
        let mut o = [0f32; MAX_TOKENS * ROW_TILE];
        while let Some(c) = queues[node].take(tid) {
            let rows = piece(c, hidden, DOWN_CHUNK_ROWS).1;
            for &si in plan.node_slots(node) {
                let (d, pairs) = (&plan.slots[si].expert.down, plan.pairs_of(&plan.slots[si]));
                for tile in row_tiles(rows.clone(), tile_rows(pairs.len())) {
                    for block in pairs.chunks(MAX_TOKENS) {
                        let args = BlockArgs::new(block.iter().map(|q| q.p), h, inter, hacts);
                        let (ar, hs) = (args.acts(), args.rows());
                        weight_row_dot(path, d, tile.clone(), ar, hs, plan.act_int8, &mut o);
                        let tb = block.len();
                        for (j, q) in block.iter().enumerate() {
                            let at = base + q.t * hidden;
                            // SAFETY: rows `rows` of this node's sum belong to the one worker that
                            // took chunk c from the node's queue.
                            let yrow = unsafe { y.range(at + tile.start..at + tile.end) };
                            let add = |(v, &ov): (&mut f32, &f32)| *v += q.w * ov;
                            if tb == 1 {
                                yrow.iter_mut().zip(&o).for_each(add); // M = 1: vectorised
                            } else {
                                yrow.iter_mut().zip(o[j..].iter().step_by(tb)).for_each(add);
                            }
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_own_share_of_the_queue_is_its_home_rows() {
        for (workers, groups, rows) in [(16, 3, 1408usize), (16, 1, 2048), (3, 2, 100), (5, 1, 7)] {
            let per_group = rows.div_ceil(CHUNK_ROWS);
            let q = HomeQueue::new(workers, groups, per_group);
            for t in 0..workers {
                let own = groups * split_range(per_group, workers, t).len();
                let mut got = vec![vec![]; groups];
                for _ in 0..own {
                    let (g, r) = piece(q.take(t).unwrap(), rows, CHUNK_ROWS);
                    got[g].extend(r);
                }
                for g in got {
                    assert_eq!(
                        g,
                        home_rows(rows, CHUNK_ROWS, workers, t).collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    #[test]
    fn pieces_cover_every_row_of_every_item_once() {
        for (items, rows, size) in [(3, 100, 32), (2, 64, 32), (5, 7, 2), (1, 5, 8)] {
            let mut hits = vec![0; items * rows];
            for c in 0..items * rows.div_ceil(size) {
                let (item, r) = piece(c, rows, size);
                assert!(r.len() <= size && !r.is_empty());
                for row in r {
                    hits[item * rows + row] += 1;
                }
            }
            assert!(hits.iter().all(|&h| h == 1), "{items} x {rows} by {size}");
        }
    }
}
