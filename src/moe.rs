//! The fused routed-expert forward: for M tokens and their top-k experts,
//! y[t] = sum_j w[t, j] * down_e( silu(gate_e x[t]) * up_e x[t] ),  e = ids[t, j].
//!
//! Two steps on the pool, each a barrier:
//! 1. gate/up: the rows of every expert in use, in chunks of 32, queued for the workers of the
//!    expert's NUMA node; each row is computed for all tokens routed to that expert. With INT8
//!    activations, the worker that completes a group of h (the down projection's activation group)
//!    also quantises it, so h needs no pass of its own.
//! 2. down: the H output rows in chunks of 32, queued for each node's workers; a chunk loops over
//!    that node's experts, summing weight * row . h into its rows of y. With several nodes each node
//!    sums into its own partial y, added at the end.

use crate::kernels::{row_tiles, weight_row_dot, WeightRef, MAX_TOKENS, ROW_TILE};
use crate::matmul::quantize_acts;
use crate::numa::{chunk_slot_rows, worker_groups};
use crate::pool::{Disjoint, Pool, WorkQueue};
use crate::quant::{quantize_act, ActRef, ActSlices, QuantActs};
use crate::simd::SimdPath;
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

/// An expert in use in this call and the (token, routing weight, pair index) routed to it.
struct Slot<'a> {
    expert: ExpertRef<'a>,
    pairs: Vec<(usize, f32, usize)>,
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
const CHUNK_ROWS: usize = 32;
/// Down (output) rows per unit of work. Each unit visits every expert of its node, each visit a
/// new stream of weights; 32 rows measured as fast as 64 on the Qwen3-30B-A3B shape and 4% faster
/// on DeepSeek-V2-Lite's (more units to share out at M = 1), 16 slower.
const DOWN_CHUNK_ROWS: usize = 32;

/// One block of up to MAX_TOKENS inputs as the kernels take them: quantised (INT8 mode) and f32.
type TokenBlock<'a> = (Vec<ActRef<'a>>, Vec<&'a [f32]>);

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// Marks a (token, expert) pair that this call skips (computed elsewhere, e.g. on the GPU).
pub const SKIP: usize = usize::MAX;

/// The routed-expert forward. `x` is [M, H]; `ids` and `weights` are [M, k]; every id must be
/// below the number of experts `expert(id)` accepts, or SKIP (the pair adds nothing).
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
) -> Vec<f32> {
    let _pin = pool.pin_caller();
    let start = Instant::now();
    let mut t = start;
    assert_eq!(x.len() % hidden, 0, "x must be [M, hidden]");
    let m = x.len() / hidden;
    assert!(
        m > 0 && ids.len().is_multiple_of(m) && ids.len() == weights.len(),
        "ids and weights must be [M, k]"
    );
    let topk = ids.len() / m;

    // Group the (token, expert) pairs by expert, in order of first use (a table indexed by id: a
    // hash map costs more than the whole grouping at these sizes).
    let mut slots: Vec<Slot> = Vec::new();
    let max_id = ids
        .iter()
        .filter(|&&e| e != SKIP)
        .max()
        .copied()
        .unwrap_or(0);
    let mut slot_of = vec![usize::MAX; max_id + 1];
    for t in 0..m {
        for j in 0..topk {
            let e = ids[t * topk + j];
            if e == SKIP {
                continue;
            }
            if slot_of[e] == usize::MAX {
                slot_of[e] = slots.len();
                slots.push(Slot {
                    expert: expert(e),
                    pairs: Vec::new(),
                });
            }
            let p = t * topk + j;
            slots[slot_of[e]].pairs.push((t, weights[p], p));
        }
    }
    if slots.is_empty() {
        return vec![0f32; m * hidden];
    }
    let npairs = m * topk;
    let nt = pool.num_threads();
    let groups = if numa {
        worker_groups(
            &(0..nt).map(|t| pool.node_of(t)).collect::<Vec<_>>(),
            pool.num_nodes(),
        )
    } else {
        vec![(0..nt).collect()]
    };
    let slot_nodes: Vec<usize> = slots
        .iter()
        .map(|s| {
            if numa {
                s.expert.node % groups.len()
            } else {
                0
            }
        })
        .map(|n| {
            if groups[n].is_empty() {
                groups.iter().position(|g| !g.is_empty()).unwrap()
            } else {
                n
            }
        })
        .collect();
    // Per node: chunks of gate/up rows, and chunks of down (output) rows, each taken from a queue
    // by that node's workers.
    let gate_chunks = chunk_slot_rows(&slot_nodes, inter, &groups, CHUNK_ROWS);
    let gate_queues: Vec<WorkQueue> = gate_chunks
        .iter()
        .map(|c| WorkQueue::new(c.len()))
        .collect();
    let down_chunks = hidden.div_ceil(DOWN_CHUNK_ROWS);
    let down_queues: Vec<WorkQueue> = groups.iter().map(|_| WorkQueue::new(down_chunks)).collect();
    let node_of_worker: Vec<usize> = (0..nt)
        .map(|tid| groups.iter().position(|g| g.contains(&tid)).unwrap_or(0))
        .collect();

    let act_int8 = act_int8
        && slots.iter().all(|s| {
            [s.expert.gate, s.expert.up, s.expert.down]
                .iter()
                .all(|w| w.int_group().is_some())
        });
    let xacts = if act_int8 {
        let group = slots[0].expert.gate.int_group().expect("checked above");
        Some(quantize_acts(pool, x, hidden, group))
    } else {
        None
    };
    let xrow = |t: usize| &x[t * hidden..(t + 1) * hidden];
    // Per slot, per block of up to MAX_TOKENS pairs: the kernels' token arguments.
    let x_chunks: Vec<Vec<TokenBlock>> = slots
        .iter()
        .map(|s| {
            s.pairs
                .chunks(MAX_TOKENS)
                .map(|c| {
                    let ar = match &xacts {
                        Some(a) => c.iter().map(|&(t, _, _)| a.token(t)).collect(),
                        None => Vec::new(),
                    };
                    (ar, c.iter().map(|&(t, _, _)| xrow(t)).collect())
                })
                .collect()
        })
        .collect();

    // INT8 mode quantises h per (pair, group of `hgroup` rows) as soon as the gate/up chunks that cover
    // the group are done (the worker finishing the last of them does it), so no pass of its own and
    // no barrier: `pending[slot * hgroups + g]` counts the group's rows still to compute.
    let hgroup = if act_int8 {
        slots[0].expert.down.int_group().expect("checked above")
    } else {
        inter
    };
    assert!(
        inter.is_multiple_of(hgroup),
        "expert intermediate size {inter} is not a multiple of the activation group {hgroup}"
    );
    let hgroups = inter / hgroup;
    let pending: Vec<AtomicUsize> = (0..if act_int8 { slots.len() * hgroups } else { 0 })
        .map(|_| AtomicUsize::new(hgroup))
        .collect();
    let mut hacts = if act_int8 {
        Some(QuantActs::new(npairs, inter, hgroup))
    } else {
        None
    };

    lap(0, &mut t);
    // 1. h[p] = silu(gate x) * up x for every pair p (and, INT8 mode, its quantised form).
    let mut h = vec![0f32; npairs * inter];
    {
        let hd = Disjoint::new(&mut h);
        let hqd = hacts.as_mut().map(|q| {
            (
                Disjoint::new(&mut q.hi),
                Disjoint::new(&mut q.lo),
                Disjoint::new(&mut q.scales),
                Disjoint::new(&mut q.scaled_sums),
            )
        });
        pool.run(&|tid| {
            let (mut og, mut ou) = ([0f32; MAX_TOKENS * ROW_TILE], [0f32; MAX_TOKENS * ROW_TILE]);
            let node = node_of_worker[tid];
            while let Some(c) = gate_queues[node].take() {
                let (si, rows) = &gate_chunks[node][c];
                let slot = &slots[*si];
                for tile in row_tiles(rows.clone()) {
                    for (ci, chunk) in slot.pairs.chunks(MAX_TOKENS).enumerate() {
                        let (ar, xs) = &x_chunks[*si][ci];
                        let e = &slot.expert;
                        weight_row_dot(path, &e.gate, tile.clone(), ar, xs, act_int8, &mut og);
                        weight_row_dot(path, &e.up, tile.clone(), ar, xs, act_int8, &mut ou);
                        let tb = chunk.len();
                        for (i, r) in tile.clone().enumerate() {
                            for (j, &(_, _, p)) in chunk.iter().enumerate() {
                                let (g, u) = (og[i * tb + j], ou[i * tb + j]);
                                // SAFETY: (pair p, row r) belongs to one chunk, and each chunk
                                // is taken by one worker: chunk_slot_rows covers every (slot,
                                // row) once and WorkQueue hands out each chunk once.
                                unsafe { *hd.at(p * inter + r) = silu(g) * u };
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
                    if pending[*si * hgroups + g].fetch_sub(done, Ordering::AcqRel) != done {
                        continue;
                    }
                    for &(_, _, p) in &slot.pairs {
                        let (v, q) = (p * inter + span.start, p * hgroups + g);
                        // SAFETY: group g of pair p is complete (its count reached zero here, once)
                        // and no other worker touches it or its quantised form in this phase.
                        unsafe {
                            quantize_act(
                                hd.range(v..v + hgroup),
                                hgroup,
                                ActSlices {
                                    hi: hi.range(v..v + hgroup),
                                    lo: lo.range(v..v + hgroup),
                                    scales: sc.range(q..q + 1),
                                    scaled_sums: ss.range(q..q + 1),
                                },
                            )
                        };
                    }
                }
            }
        });
    }

    lap(1, &mut t);
    // 2. y[t] += w * down h, per node.
    let ngroups = groups.len();
    let mut partial = vec![0f32; ngroups * m * hidden];
    let h_chunks: Vec<Vec<TokenBlock>> = slots
        .iter()
        .map(|s| {
            s.pairs
                .chunks(MAX_TOKENS)
                .map(|c| {
                    let ar = match &hacts {
                        Some(a) => c.iter().map(|&(_, _, p)| a.token(p)).collect(),
                        None => Vec::new(),
                    };
                    (
                        ar,
                        c.iter()
                            .map(|&(_, _, p)| &h[p * inter..(p + 1) * inter])
                            .collect(),
                    )
                })
                .collect()
        })
        .collect();
    {
        let yd = Disjoint::new(&mut partial);
        pool.run(&|tid| {
            let node = node_of_worker[tid];
            let base = node * m * hidden;
            let mut o = [0f32; MAX_TOKENS * ROW_TILE];
            while let Some(c) = down_queues[node].take() {
                let rows = c * DOWN_CHUNK_ROWS..((c + 1) * DOWN_CHUNK_ROWS).min(hidden);
                for (si, slot) in slots.iter().enumerate() {
                    if slot_nodes[si] != node {
                        continue;
                    }
                    for tile in row_tiles(rows.clone()) {
                        for (ci, chunk) in slot.pairs.chunks(MAX_TOKENS).enumerate() {
                            let (ar, hs) = &h_chunks[si][ci];
                            let d = &slot.expert.down;
                            weight_row_dot(path, d, tile.clone(), ar, hs, act_int8, &mut o);
                            let tb = chunk.len();
                            for (i, r) in tile.clone().enumerate() {
                                for (j, &(t, w, _)) in chunk.iter().enumerate() {
                                    // SAFETY: rows `rows` of this node's partial output belong to
                                    // the one worker that took chunk c from the node's queue.
                                    unsafe { *yd.at(base + t * hidden + r) += w * o[i * tb + j] };
                                }
                            }
                        }
                    }
                }
            }
        });
    }
    lap(2, &mut t);
    PHASE_NS[3].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    CALLS.fetch_add(1, Ordering::Relaxed);
    if ngroups == 1 {
        return partial;
    }
    let mut y = partial[..m * hidden].to_vec();
    for g in 1..ngroups {
        for (a, b) in y
            .iter_mut()
            .zip(&partial[g * m * hidden..(g + 1) * m * hidden])
        {
            *a += b;
        }
    }
    y
}
