//! AVX2+FMA kernels. Callers (kernels::row_dot_*) check CPU support and slice lengths.

use super::dispatch_tokens;
use crate::quant::{ActRef, MatRef, HI_WEIGHT};
use std::arch::x86_64::*;
use std::ops::Range;

/// Sum of the 8 lanes.
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The 64 stored (unsigned) weights of block `blk` of a row: elements 0..32 and 32..64.
///
/// # Safety
/// `row` must point to a packed row with at least `blk + 1` blocks of 64 values.
#[target_feature(enable = "avx2,fma")]
unsafe fn load_block<const BITS: u32>(row: *const u8, blk: usize) -> (__m256i, __m256i) {
    if BITS == 8 {
        let p = row.add(blk * 64) as *const __m256i;
        prefetch(p as *const u8);
        (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
    } else {
        prefetch(row.add(blk * 32));
        let raw = _mm256_loadu_si256(row.add(blk * 32) as *const __m256i);
        let m = _mm256_set1_epi8(0x0F);
        (
            _mm256_and_si256(raw, m),
            _mm256_and_si256(_mm256_srli_epi16(raw, 4), m),
        )
    }
}

/// Ask for the weight line PREFETCH_BYTES ahead of `p` (rows are streamed in address order), so
/// DRAM reads overlap the arithmetic. A prefetch never faults, so any address is fine.
#[inline(always)]
pub(super) fn prefetch(p: *const u8) {
    // SAFETY: prefetch is a hint with no architectural effect; it does not fault on any address,
    // and wrapping_add avoids out-of-bounds pointer arithmetic.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(super::PREFETCH_BYTES) as *const i8) }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// # Safety
/// AVX2+FMA present; the rows exist; `out` holds rows.len() * T values; each activation has >= K values and >= K/group groups.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_dot_int(m: &MatRef, rows: Range<usize>, acts: &[ActRef], out: &mut [f32]) {
    dispatch_tokens!(dot_int, m.layout.bits, acts.len(), (m, rows, acts, out))
}

#[target_feature(enable = "avx2,fma")]
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
        // Group sizes are powers of two: shifts and masks instead of divisions in the loops.
        let gshift = g.trailing_zeros();
        let row = m.row(r).as_ptr();
        let ws = m.row_scales(r);
        let ones = _mm256_set1_epi16(1);
        let mut facc = [_mm256_setzero_ps(); T];
        // One i32 accumulator per token holds 254 * dot(q, hi) + dot(q, lo): madd by 254 and by 1
        // folds the two terms together (|sum| < 2^31 for groups of at most 128).
        let mut iacc = [_mm256_setzero_si256(); T];
        let c254 = _mm256_set1_epi16(HI_WEIGHT as i16);
        for blk in 0..l.k / 64 {
            let (w0, w1) = load_block::<BITS>(row, blk);
            for (h, w) in [(0usize, w0), (1, w1)] {
                let e = blk * 64 + h * 32;
                // INT4: the stored nibble (0..15) is the unsigned operand; the +8 offset is removed
                // at the end. INT8: |q| is the unsigned operand and q's sign moves onto x, so the
                // pair sums stay within i16 (2 * 128 * 127 < 32768).
                let q = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
                let wu = if BITS == 8 { _mm256_abs_epi8(q) } else { w };
                for t in 0..T {
                    let xh = _mm256_loadu_si256(acts[t].hi.as_ptr().add(e) as *const __m256i);
                    let xl = _mm256_loadu_si256(acts[t].lo.as_ptr().add(e) as *const __m256i);
                    let (xh, xl) = if BITS == 8 {
                        (_mm256_sign_epi8(xh, q), _mm256_sign_epi8(xl, q))
                    } else {
                        (xh, xl)
                    };
                    let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xh), c254);
                    let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xl), ones);
                    iacc[t] = _mm256_add_epi32(iacc[t], _mm256_add_epi32(ph, pl));
                }
                if (e + 32) & (g - 1) == 0 {
                    let gi = e >> gshift;
                    for t in 0..T {
                        let s = _mm256_set1_ps(ws[gi] * acts[t].scales[gi]);
                        facc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[t]), s, facc[t]);
                        iacc[t] = _mm256_setzero_si256();
                    }
                }
            }
        }
        for t in 0..T {
            let mut v = hsum(facc[t]);
            if BITS == 4 {
                v -= 8.0 * dot(ws, acts[t].scaled_sums);
            }
            out[t] = v;
        }
    }
}

/// # Safety
/// AVX2+FMA present; the rows exist; `out` holds rows.len() * T values; each x has >= K values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_dot_f32(m: &MatRef, rows: Range<usize>, xs: &[&[f32]], out: &mut [f32]) {
    dispatch_tokens!(dot_f32, m.layout.bits, xs.len(), (m, rows, xs, out))
}

#[target_feature(enable = "avx2,fma")]
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
        let mut acc = [_mm256_setzero_ps(); T];
        for blk in 0..l.k / 64 {
            let (w0, w1) = load_block::<BITS>(row, blk);
            for (h, w) in [(0usize, w0), (1, w1)] {
                let e = blk * 64 + h * 32;
                // Signed values: INT8 stored q+128 -> flip the top bit; INT4 stored q+8 -> subtract 8.
                let q = if BITS == 8 {
                    _mm256_xor_si256(w, _mm256_set1_epi8(-128))
                } else {
                    _mm256_sub_epi8(w, _mm256_set1_epi8(8))
                };
                let s = _mm256_set1_ps(ws[e >> gshift]);
                let lo = _mm256_castsi256_si128(q);
                let hi = _mm256_extracti128_si256(q, 1);
                for (p, v) in [
                    (0usize, lo),
                    (8, _mm_srli_si128(lo, 8)),
                    (16, hi),
                    (24, _mm_srli_si128(hi, 8)),
                ] {
                    let wf = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s);
                    for t in 0..T {
                        let x = _mm256_loadu_ps(xs[t].as_ptr().add(e + p));
                        acc[t] = _mm256_fmadd_ps(wf, x, acc[t]);
                    }
                }
            }
        }
        for t in 0..T {
            out[t] = hsum(acc[t]);
        }
    }
}
