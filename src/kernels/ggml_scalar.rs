//! Scalar reference kernels for GGUF weights (every supported type), the definitions the SIMD GGUF
//! kernels are tested against. f32 activations: each block is dequantised with
//! `ggml_quants::dequantize_block` and dotted with the activations. INT8 activations: each block
//! in integer form (`ggml_quants::int_block`, value = a * q + b per 16 values) against the two-term
//! activations (`quant::QuantActs`, groups of `ggml_quants::ACT_GROUP`), exact integer sums per
//! 16 values.

use crate::ggml_quants::{dequantize_block, int_block, GgufMatRef, ACT_GROUP, MAX_BLOCK};
use crate::quant::{ActRef, HI_WEIGHT};
use std::ops::Range;

/// out[(r - rows.start) * T + t] = W[r] . x[t], r in `rows`.
pub fn row_dot_f32(m: &GgufMatRef, rows: Range<usize>, xs: &[&[f32]], out: &mut [f32]) {
    let (bs, bb) = (m.ty.block_size(), m.ty.block_bytes());
    let mut buf = [0f32; MAX_BLOCK];
    let nt = xs.len();
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let acc = &mut out[i * nt..(i + 1) * nt];
        acc.fill(0.0);
        for b in 0..m.blocks_per_row() {
            dequantize_block(m.ty, &row[b * bb..(b + 1) * bb], &mut buf);
            for (a, x) in acc.iter_mut().zip(xs) {
                let xb = &x[b * bs..(b + 1) * bs];
                *a += buf[..bs].iter().zip(xb).map(|(w, v)| w * v).sum::<f32>();
            }
        }
    }
}

/// out[(r - rows.start) * T + t] = W[r] . act[t] for INT8 activations quantised in groups of
/// ACT_GROUP: per 16 values, unit * (a * sum(q * x) + b * sum(x)) with x = 254 * hi + lo.
pub fn row_dot_int(m: &GgufMatRef, rows: Range<usize>, acts: &[ActRef], out: &mut [f32]) {
    let bs = m.ty.block_size();
    let bb = m.ty.block_bytes();
    let (mut q, mut a, mut b) = ([0i8; 256], [0f32; 16], [0f32; 16]);
    let nt = acts.len();
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = [0f64; crate::kernels::MAX_TOKENS];
        for blk in 0..m.blocks_per_row() {
            int_block(m.ty, &row[blk * bb..(blk + 1) * bb], &mut q, &mut a, &mut b);
            for (t, act) in acts.iter().enumerate() {
                for s in 0..bs / 16 {
                    let e = blk * bs + 16 * s;
                    let (mut dq, mut sx) = (0i64, 0i64);
                    for j in 0..16 {
                        let x = HI_WEIGHT as i64 * act.hi[e + j] as i64 + act.lo[e + j] as i64;
                        dq += q[16 * s + j] as i64 * x;
                        sx += x;
                    }
                    let unit = act.scales[e / ACT_GROUP] as f64;
                    acc[t] += unit * (a[s] as f64 * dq as f64 + b[s] as f64 * sx as f64);
                }
            }
        }
        for t in 0..nt {
            out[i * nt + t] = acc[t] as f32;
        }
    }
}
