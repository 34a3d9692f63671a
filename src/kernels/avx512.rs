//! AVX-512 kernels (F/BW/VL + VNNI): `vpdpbusd` for INT8 activations, FMA for f32 activations.
//! Callers (kernels::row_dot_*) check CPU support and slice lengths.

use super::avx2::prefetch;
use super::dispatch_tokens;
use crate::quant::{ActRef, MatRef, HI_WEIGHT};
use std::arch::x86_64::*;
use std::ops::Range;

/// The 64 stored (unsigned) weights of block `blk` of a row, in order.
///
/// # Safety
/// `row` must point to a packed row with at least `blk + 1` blocks of 64 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn load_block<const BITS: u32>(row: *const u8, blk: usize) -> __m512i {
    if BITS == 8 {
        prefetch(row.add(blk * 64));
        _mm512_loadu_si512(row.add(blk * 64) as *const _)
    } else {
        prefetch(row.add(blk * 32));
        // Byte j of the block holds value j (low nibble) and value j + 32 (high nibble): the 32
        // bytes go to both halves (a load, no shuffle), the upper half's shifted down by 4.
        let raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(row.add(blk * 32) as *const __m256i));
        let shifted = _mm512_mask_srli_epi16(raw, 0xFFFF_0000, raw, 4);
        _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
    }
}

/// # Safety
/// AVX-512 F/BW/VL/VNNI present; the rows exist; `out` holds rows.len() * T values; each activation has >= K values and groups.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn row_dot_int(m: &MatRef, rows: Range<usize>, acts: &[ActRef], out: &mut [f32]) {
    dispatch_tokens!(dot_int, m.layout.bits, acts.len(), (m, rows, acts, out))
}

#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
/// # Safety
/// As for `row_dot_int`; `acts.len() == T`.
unsafe fn dot_int<const BITS: u32, const T: usize>(
    m: &MatRef,
    rows: Range<usize>,
    acts: &[ActRef],
    out: &mut [f32],
) {
    let row0 = rows.start;
    for r in rows {
        let out = &mut out[(r - row0) * T..(r - row0 + 1) * T];
        let l = m.layout;
        let g = l.group;
        let row = m.row(r).as_ptr();
        let ws = m.row_scales(r);
        // The sums against the high and the low terms go to two f32 accumulators, joined once per
        // row as 254 * high + low: fewer operations per group than joining the integer sums.
        let mut fhi = [_mm512_setzero_ps(); T];
        let mut flo = [_mm512_setzero_ps(); T];
        // vpdpbusd multiplies the stored unsigned weights (q + offset) by signed activations; the
        // offset * sum(x) part is removed once per row below.
        if g == 32 {
            // Each 64-value block holds two groups: lanes 0..8 sum values 0..32, lanes 8..16 the rest.
            for blk in 0..l.k / 64 {
                let w = load_block::<BITS>(row, blk);
                let sw = _mm512_mask_blend_ps(
                    0xFF00,
                    _mm512_set1_ps(ws[2 * blk]),
                    _mm512_set1_ps(ws[2 * blk + 1]),
                );
                for t in 0..T {
                    let a = &acts[t];
                    let xh = _mm512_loadu_si512(a.hi.as_ptr().add(blk * 64) as *const _);
                    let xl = _mm512_loadu_si512(a.lo.as_ptr().add(blk * 64) as *const _);
                    let ih = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xh);
                    let il = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xl);
                    let sx = _mm512_mask_blend_ps(
                        0xFF00,
                        _mm512_set1_ps(a.scales[2 * blk]),
                        _mm512_set1_ps(a.scales[2 * blk + 1]),
                    );
                    let s = _mm512_mul_ps(sw, sx);
                    fhi[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ih), s, fhi[t]);
                    flo[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(il), s, flo[t]);
                }
            }
        } else {
            let blocks_per_group = g / 64;
            for gi in 0..l.k / g {
                let mut ih = [_mm512_setzero_si512(); T];
                let mut il = [_mm512_setzero_si512(); T];
                for b in 0..blocks_per_group {
                    let blk = gi * blocks_per_group + b;
                    let w = load_block::<BITS>(row, blk);
                    for t in 0..T {
                        let xh = _mm512_loadu_si512(acts[t].hi.as_ptr().add(blk * 64) as *const _);
                        let xl = _mm512_loadu_si512(acts[t].lo.as_ptr().add(blk * 64) as *const _);
                        ih[t] = _mm512_dpbusd_epi32(ih[t], w, xh);
                        il[t] = _mm512_dpbusd_epi32(il[t], w, xl);
                    }
                }
                for t in 0..T {
                    let s = _mm512_set1_ps(ws[gi] * acts[t].scales[gi]);
                    fhi[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ih[t]), s, fhi[t]);
                    flo[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(il[t]), s, flo[t]);
                }
            }
        }
        let offset = if BITS == 8 { 128.0 } else { 8.0 };
        for t in 0..T {
            let joined = _mm512_fmadd_ps(fhi[t], _mm512_set1_ps(HI_WEIGHT as f32), flo[t]);
            out[t] = _mm512_reduce_add_ps(joined) - offset * dot16(ws, acts[t].scaled_sums);
        }
    }
}

/// sum(a[i] * b[i]) over the shorter slice, 16 lanes at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let m: __mmask16 = if n - i >= 16 {
            0xFFFF
        } else {
            (1u16 << (n - i)) - 1
        };
        // SAFETY: the mask covers only lanes i..n, within both slices; masked-off lanes are not read.
        unsafe {
            let x = _mm512_maskz_loadu_ps(m, a.as_ptr().add(i));
            let y = _mm512_maskz_loadu_ps(m, b.as_ptr().add(i));
            acc = _mm512_fmadd_ps(x, y, acc);
        }
        i += 16;
    }
    _mm512_reduce_add_ps(acc)
}

/// # Safety
/// AVX-512 F/BW/VL/VNNI present; the rows exist; `out` holds rows.len() * T values; each x has >= K values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn row_dot_f32(m: &MatRef, rows: Range<usize>, xs: &[&[f32]], out: &mut [f32]) {
    dispatch_tokens!(dot_f32, m.layout.bits, xs.len(), (m, rows, xs, out))
}

/// acc[t] += (16 weights of piece P, widened and scaled) * x[t][e + 16P..].
macro_rules! piece {
    ($q:expr, $P:literal, $e:expr, $gshift:expr, $ws:expr, $xs:expr, $acc:expr, $T:expr) => {{
        let v = _mm512_extracti32x4_epi32($q, $P);
        let s = _mm512_set1_ps($ws[($e + 16 * $P) >> $gshift]);
        let wf = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), s);
        for t in 0..$T {
            let x = _mm512_loadu_ps($xs[t].as_ptr().add($e + 16 * $P));
            $acc[t] = _mm512_fmadd_ps(wf, x, $acc[t]);
        }
    }};
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
/// # Safety
/// As for `row_dot_f32`; `xs.len() == T`.
unsafe fn dot_f32<const BITS: u32, const T: usize>(
    m: &MatRef,
    rows: Range<usize>,
    xs: &[&[f32]],
    out: &mut [f32],
) {
    let row0 = rows.start;
    for r in rows {
        let out = &mut out[(r - row0) * T..(r - row0 + 1) * T];
        let l = m.layout;
        let g = l.group;
        // Group sizes are powers of two: shifts and masks instead of divisions in the loops.
        let gshift = g.trailing_zeros();
        let row = m.row(r).as_ptr();
        let ws = m.row_scales(r);
        let mut acc = [_mm512_setzero_ps(); T];
        for blk in 0..l.k / 64 {
            let w = load_block::<BITS>(row, blk);
            let q = if BITS == 8 {
                _mm512_xor_si512(w, _mm512_set1_epi8(-128))
            } else {
                _mm512_sub_epi8(w, _mm512_set1_epi8(8))
            };
            let e = blk * 64;
            piece!(q, 0, e, gshift, ws, xs, acc, T);
            piece!(q, 1, e, gshift, ws, xs, acc, T);
            piece!(q, 2, e, gshift, ws, xs, acc, T);
            piece!(q, 3, e, gshift, ws, xs, acc, T);
        }
        for t in 0..T {
            out[t] = _mm512_reduce_add_ps(acc[t]);
        }
    }
}
