//! The fused routed-expert forward: for M tokens and their top-k experts,
//! y[t] = sum_j w[t, j] * down_e( silu(gate_e x[t]) * up_e x[t] ),  e = ids[t, j].
//!
//! Three steps on the pool, each a barrier:
//! 1. gate/up: the rows of every expert in use, laid end to end, split over the workers of the
//!    expert's NUMA node; each row is computed for all tokens routed to that expert.
//! 2. (INT8 activations only) quantise the hidden vectors h, one per (token, expert) pair.
//! 3. down: the H output rows split over each node's workers, each looping over that node's
//!    experts and summing weight * row . h into its rows of y. With several nodes each node
//!    sums into its own partial y, added at the end.

use crate::kernels::{row_dot_f32, row_dot_int, MAX_TOKENS};
use crate::matmul::quantize_acts;
use crate::numa::{plan_slot_rows, worker_groups};
use crate::pool::{split_range, Disjoint, Pool};
use crate::quant::{ActRef, MatRef};
use crate::simd::SimdPath;

/// One expert's three matrices and the NUMA node its memory is on.
#[derive(Clone, Copy)]
pub struct ExpertRef<'a> {
    pub gate: MatRef<'a>,
    pub up: MatRef<'a>,
    pub down: MatRef<'a>,
    pub node: usize,
}

/// An expert in use in this call and the (token, routing weight, pair index) routed to it.
struct Slot<'a> {
    expert: ExpertRef<'a>,
    pairs: Vec<(usize, f32, usize)>,
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// The routed-expert forward. `x` is [M, H]; `ids` and `weights` are [M, k]; every id must be
/// below the number of experts `expert(id)` accepts. With `numa`, work follows `ExpertRef::node`.
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
    assert_eq!(x.len() % hidden, 0, "x must be [M, hidden]");
    let m = x.len() / hidden;
    assert!(m > 0 && ids.len() % m == 0 && ids.len() == weights.len(), "ids and weights must be [M, k]");
    let topk = ids.len() / m;

    // Group the (token, expert) pairs by expert, in order of first use.
    let mut slots: Vec<Slot> = Vec::new();
    let mut slot_of: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for t in 0..m {
        for j in 0..topk {
            let e = ids[t * topk + j];
            let s = *slot_of.entry(e).or_insert_with(|| {
                slots.push(Slot { expert: expert(e), pairs: Vec::new() });
                slots.len() - 1
            });
            let p = t * topk + j;
            slots[s].pairs.push((t, weights[p], p));
        }
    }
    let npairs = m * topk;
    let nt = pool.num_threads();
    let groups = if numa {
        worker_groups(&(0..nt).map(|t| pool.node_of(t)).collect::<Vec<_>>(), pool.num_nodes())
    } else {
        vec![(0..nt).collect()]
    };
    let slot_nodes: Vec<usize> = slots
        .iter()
        .map(|s| if numa { s.expert.node % groups.len() } else { 0 })
        .map(|n| if groups[n].is_empty() { groups.iter().position(|g| !g.is_empty()).unwrap() } else { n })
        .collect();
    let gate_plan = plan_slot_rows(&slot_nodes, inter, &groups);

    let xacts = if act_int8 { Some(quantize_acts(pool, x, hidden, slots[0].expert.gate.layout.group)) } else { None };
    let xrow = |t: usize| &x[t * hidden..(t + 1) * hidden];
    // Per slot, per block of up to MAX_TOKENS pairs: the kernels' token arguments.
    let x_chunks: Vec<Vec<(Vec<ActRef>, Vec<&[f32]>)>> = slots
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

    // 1. h[p] = silu(gate x) * up x for every pair p.
    let mut h = vec![0f32; npairs * inter];
    {
        let hd = Disjoint::new(&mut h);
        pool.run(&|tid| {
            let (mut og, mut ou) = ([0f32; MAX_TOKENS], [0f32; MAX_TOKENS]);
            for (si, rows) in &gate_plan[tid] {
                let slot = &slots[*si];
                for r in rows.clone() {
                    for (ci, chunk) in slot.pairs.chunks(MAX_TOKENS).enumerate() {
                        let (ar, xs) = &x_chunks[*si][ci];
                        if act_int8 {
                            row_dot_int(path, &slot.expert.gate, r, ar, &mut og);
                            row_dot_int(path, &slot.expert.up, r, ar, &mut ou);
                        } else {
                            row_dot_f32(path, &slot.expert.gate, r, xs, &mut og);
                            row_dot_f32(path, &slot.expert.up, r, xs, &mut ou);
                        }
                        for (i, &(_, _, p)) in chunk.iter().enumerate() {
                            // SAFETY: (pair p, row r) belongs to this worker's plan only:
                            // plan_slot_rows covers every (slot, row) exactly once.
                            unsafe { *hd.at(p * inter + r) = silu(og[i]) * ou[i] };
                        }
                    }
                }
            }
        });
    }

    // 2. Quantise h per pair.
    let group = slots[0].expert.down.layout.group;
    let hacts = if act_int8 { Some(quantize_acts(pool, &h, inter, group)) } else { None };

    // 3. y[t] += w * down h, per node.
    let ngroups = groups.len();
    let mut partial = vec![0f32; ngroups * m * hidden];
    let h_chunks: Vec<Vec<(Vec<ActRef>, Vec<&[f32]>)>> = slots
        .iter()
        .map(|s| {
            s.pairs
                .chunks(MAX_TOKENS)
                .map(|c| {
                    let ar = match &hacts {
                        Some(a) => c.iter().map(|&(_, _, p)| a.token(p)).collect(),
                        None => Vec::new(),
                    };
                    (ar, c.iter().map(|&(_, _, p)| &h[p * inter..(p + 1) * inter]).collect())
                })
                .collect()
        })
        .collect();
    {
        let yd = Disjoint::new(&mut partial);
        pool.run(&|tid| {
            let Some(node) = groups.iter().position(|g| g.contains(&tid)) else { return };
            let wi = groups[node].iter().position(|&t| t == tid).unwrap();
            let rows = split_range(hidden, groups[node].len(), wi);
            if rows.is_empty() {
                return;
            }
            let base = node * m * hidden;
            let mut o = [0f32; MAX_TOKENS];
            for (si, slot) in slots.iter().enumerate() {
                if slot_nodes[si] != node {
                    continue;
                }
                for r in rows.clone() {
                    for (ci, chunk) in slot.pairs.chunks(MAX_TOKENS).enumerate() {
                        let (ar, hs) = &h_chunks[si][ci];
                        if act_int8 {
                            row_dot_int(path, &slot.expert.down, r, ar, &mut o);
                        } else {
                            row_dot_f32(path, &slot.expert.down, r, hs, &mut o);
                        }
                        for (i, &(t, w, _)) in chunk.iter().enumerate() {
                            // SAFETY: rows `rows` of this node's partial output belong to this
                            // worker only (split_range over the node's workers is disjoint).
                            unsafe { *yd.at(base + t * hidden + r) += w * o[i] };
                        }
                    }
                }
            }
        });
    }
    if ngroups == 1 {
        return partial;
    }
    let mut y = partial[..m * hidden].to_vec();
    for g in 1..ngroups {
        for (a, b) in y.iter_mut().zip(&partial[g * m * hidden..(g + 1) * m * hidden]) {
            *a += b;
        }
    }
    y
}
