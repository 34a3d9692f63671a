//! Scalar reference kernels: the definition every SIMD path is tested against.

use crate::quant::{unpack, ActRef, MatRef, HI_WEIGHT};
use std::ops::Range;

/// out[t] = sum over groups of (W scale * act unit) * (254 * dot(q, hi) + dot(q, lo)).
pub fn row_dot_int(m: &MatRef, rows: Range<usize>, acts: &[ActRef], out: &mut [f32]) {
    for (i, r) in rows.enumerate() {
        row_int(m, r, acts, &mut out[i * acts.len()..(i + 1) * acts.len()]);
    }
}

#[allow(clippy::needless_range_loop)]
fn row_int(m: &MatRef, r: usize, acts: &[ActRef], out: &mut [f32]) {
    let l = m.layout;
    let (row, ws) = (m.row(r), m.row_scales(r));
    for (t, a) in acts.iter().enumerate() {
        let mut acc = 0f32;
        for gi in 0..l.groups_per_row() {
            let (mut ihi, mut ilo) = (0i32, 0i32);
            for i in gi * l.group..(gi + 1) * l.group {
                let q = unpack(row, l.bits, i);
                ihi += q * a.hi[i] as i32;
                ilo += q * a.lo[i] as i32;
            }
            acc += (HI_WEIGHT * ihi + ilo) as f32 * (ws[gi] * a.scales[gi]);
        }
        out[t] = acc;
    }
}

/// out[t] = sum over groups of W scale * (float dot of the group).
pub fn row_dot_f32(m: &MatRef, rows: Range<usize>, xs: &[&[f32]], out: &mut [f32]) {
    for (i, r) in rows.enumerate() {
        row_f32(m, r, xs, &mut out[i * xs.len()..(i + 1) * xs.len()]);
    }
}

#[allow(clippy::needless_range_loop)]
fn row_f32(m: &MatRef, r: usize, xs: &[&[f32]], out: &mut [f32]) {
    let l = m.layout;
    let (row, ws) = (m.row(r), m.row_scales(r));
    for (t, x) in xs.iter().enumerate() {
        let mut acc = 0f32;
        for gi in 0..l.groups_per_row() {
            let mut gsum = 0f32;
            for i in gi * l.group..(gi + 1) * l.group {
                gsum += unpack(row, l.bits, i) as f32 * x[i];
            }
            acc += gsum * ws[gi];
        }
        out[t] = acc;
    }
}
