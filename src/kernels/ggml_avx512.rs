//! AVX-512 (F/BW/VL + VNNI) kernels for GGUF weights with INT8 activations (two-term activations
//! in groups of 32, see `quant::QuantActs`): 64 weights are unpacked to bytes in one register and
//! dotted with both activation terms by `vpdpbusd` (exact i32 per 32 values, no i16 step, so
//! unsigned weights up to 255 are fine); one FMA per 64 values applies each 32's block scale times
//! its activation unit (lanes 0..8 and 8..16).
//!
//! Unsigned weights (Q4_0/1, Q5_0/1, Q8_0 as q + 128, Q4_K, Q5_K) go to vpdpbusd as unpacked and
//! their offset or minimum is applied per 32 values through the activation group sums; Q6_K
//! (sub-block scales per 16 values) gives vpdpbusd |q| and moves q's sign onto the activations.
//! The f32-activation GGUF kernels are the AVX2 ones. Callers (kernels::gguf_row_dot_int) check
//! CPU support and slice lengths.

use super::avx2::prefetch;
use super::ggml_avx2::{
    block_offset, decode32, has_min, ID_Q4_0, ID_Q4_1, ID_Q5_0, ID_Q5_1, ID_Q8_0,
};
use crate::ggml_quants::{k_scales_mins_packed, GgmlType, GgufMatRef};
use crate::quant::{ActRef, HI_WEIGHT};
use std::arch::x86_64::*;
use std::ops::Range;

/// # Safety
/// AVX-512 F/BW/VL/VNNI present; the rows exist; `out` holds rows.len() * acts.len() values; each
/// activation has >= K values in hi and lo and >= K / 32 units and group sums;
/// 1 <= acts.len() <= MAX_TOKENS; `m.ty.has_int_kernel()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn row_dot_int(m: &GgufMatRef, rows: Range<usize>, acts: &[ActRef], out: &mut [f32]) {
    macro_rules! go {
        ($f:ident $(, $c:expr)?) => {
            match acts.len() {
                1 => $f::<$($c,)? 1>(m, rows, acts, out),
                2 => $f::<$($c,)? 2>(m, rows, acts, out),
                3 => $f::<$($c,)? 3>(m, rows, acts, out),
                _ => $f::<$($c,)? 4>(m, rows, acts, out),
            }
        };
    }
    match m.ty {
        GgmlType::Q8_0 => go!(blocks32_int, ID_Q8_0),
        GgmlType::Q4_0 => go!(blocks32_int, ID_Q4_0),
        GgmlType::Q4_1 => go!(blocks32_int, ID_Q4_1),
        GgmlType::Q5_0 => go!(blocks32_int, ID_Q5_0),
        GgmlType::Q5_1 => go!(blocks32_int, ID_Q5_1),
        GgmlType::Q4K => go!(q45_k_int, false),
        GgmlType::Q5K => go!(q45_k_int, true),
        GgmlType::Q6K => go!(q6_k_int),
        _ => super::ggml_scalar::row_dot_int(m, rows, acts, out),
    }
}

/// Per token t: dot(w, hi_t[e..e+64]) and dot(w, lo_t[e..e+64]) as 16 i32 lanes each (lane k sums
/// values 4k..4k+4; |lane| <= 4 * 255 * 127 < 2^17, exact in f32). The caller weighs the high term
/// by 254 in float (an i32 multiply would cost more than the second FMA). SIGNED: w is signed (-128..=127), |w|
/// is the unsigned operand and w's sign moves onto the activations (-x is exact: x >= -127).
/// `half`: only values e..e+32 exist; the activations past them are read as zero (masked load).
///
/// # Safety
/// AVX-512 present; acts.len() >= T and every act's hi and lo hold >= e + 64 values (e + 32 with
/// `half`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn idot64<const SIGNED: bool, const T: usize>(
    w: __m512i,
    acts: &[ActRef],
    e: usize,
    half: bool,
) -> ([__m512i; T], [__m512i; T]) {
    let (wu, neg) = if SIGNED {
        (_mm512_abs_epi8(w), _mm512_movepi8_mask(w))
    } else {
        (w, 0)
    };
    let zero = _mm512_setzero_si512();
    let (mut rh, mut rl) = ([zero; T], [zero; T]);
    for t in 0..T {
        let (ph, pl) = (acts[t].hi.as_ptr().add(e), acts[t].lo.as_ptr().add(e));
        // SAFETY: the full loads read e..e+64, the masked ones e..e+32 (masked-off bytes are not
        // accessed), within hi and lo by the caller's guarantee.
        let (mut xh, mut xl) = if half {
            (
                _mm512_maskz_loadu_epi8(0xFFFF_FFFF, ph),
                _mm512_maskz_loadu_epi8(0xFFFF_FFFF, pl),
            )
        } else {
            (
                _mm512_loadu_si512(ph as *const _),
                _mm512_loadu_si512(pl as *const _),
            )
        };
        if SIGNED {
            xh = _mm512_mask_sub_epi8(xh, neg, zero, xh);
            xl = _mm512_mask_sub_epi8(xl, neg, zero, xl);
        }
        rh[t] = _mm512_dpbusd_epi32(zero, wu, xh);
        rl[t] = _mm512_dpbusd_epi32(zero, wu, xl);
    }
    (rh, rl)
}

/// The f32 accumulators of one row: the high and low activation terms apart (summed as
/// 254 * high + low at the end), and the offset / minimum terms.
struct Acc<const T: usize> {
    hi: [__m512; T],
    lo: [__m512; T],
    off: [__m256; T],
}

impl<const T: usize> Acc<T> {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn new() -> Self {
        Acc {
            hi: [_mm512_setzero_ps(); T],
            lo: [_mm512_setzero_ps(); T],
            off: [_mm256_setzero_ps(); T],
        }
    }
    /// Add the integer dots (ih, il) of token t times the per-lane scale s.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn add(&mut self, t: usize, ih: __m512i, il: __m512i, s: __m512) {
        self.hi[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ih), s, self.hi[t]);
        self.lo[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(il), s, self.lo[t]);
    }
    /// out[i * T + t] = 254 * sum(hi) + sum(lo) + sum(off) + extra[t].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn finish(&self, extra: &[f32; T], out: &mut [f32], i: usize) {
        for t in 0..T {
            let v = _mm512_fmadd_ps(self.hi[t], _mm512_set1_ps(HI_WEIGHT as f32), self.lo[t]);
            let o = self.off[t];
            let o = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1));
            let o = _mm_add_ps(o, _mm_movehl_ps(o, o));
            let o = _mm_add_ss(o, _mm_shuffle_ps(o, o, 1));
            out[i * T + t] = _mm512_reduce_add_ps(v) + _mm_cvtss_f32(o) + extra[t];
        }
    }
}

/// The f16 at byte `at` of `b` as f32 (F16C, implied by AVX-512 F).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn half_f16c(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// A vector of `lo` in lanes 0..8 and `hi` in lanes 8..16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn halves(lo: f32, hi: f32) -> __m512 {
    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lo), _mm512_set1_ps(hi))
}

/// d and o (value = d * w + o) of 32-value block `b` of `row` (F16C conversions).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn block_d_o<const TY: u32>(row: &[u8], bb: usize, b: usize) -> (f32, f32) {
    let d = half_f16c(row, b * bb);
    let m = if has_min(TY) {
        half_f16c(row, b * bb + 2)
    } else {
        0.0
    };
    (d, block_offset::<TY>(d, m))
}

/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (`TY`): two 32-value blocks per 64-value step. Runs of 8 blocks
/// take their 8 scales and offsets as vectors; the rest go by pairs (an odd last block alone, the
/// upper half zero).
///
/// # Safety
/// As for `row_dot_int`, with acts.len() == T and m.ty matching TY.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn blocks32_int<const TY: u32, const T: usize>(
    m: &GgufMatRef,
    rows: Range<usize>,
    acts: &[ActRef],
    out: &mut [f32],
) {
    let (bb, nb) = (m.ty.block_bytes(), m.blocks_per_row());
    let pick: [__m512i; 4] = std::array::from_fn(|c| {
        _mm512_mask_blend_epi32(
            0xFF00,
            _mm512_set1_epi32(2 * c as i32),
            _mm512_set1_epi32(2 * c as i32 + 1),
        )
    });
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = Acc::<T>::new();
        let mut off = [0f32; T];
        let mut b = 0;
        while b + 8 <= nb {
            let run = &row[b * bb..(b + 8) * bb];
            prefetch(run.as_ptr());
            prefetch(run.as_ptr().wrapping_add(64));
            prefetch(run.as_ptr().wrapping_add(128));
            let f16s = |at: usize| {
                let h: [u16; 8] = std::array::from_fn(|j| {
                    u16::from_le_bytes([run[j * bb + at], run[j * bb + at + 1]])
                });
                // SAFETY: h is 8 u16 values (16 bytes).
                _mm256_cvtph_ps(unsafe { _mm_loadu_si128(h.as_ptr() as *const __m128i) })
            };
            let dv = f16s(0);
            let ov = if has_min(TY) {
                f16s(2)
            } else {
                _mm256_mul_ps(dv, _mm256_set1_ps(block_offset::<TY>(1.0, 0.0)))
            };
            let mut su = [_mm512_setzero_ps(); T];
            for t in 0..T {
                let (u, ss) = (&acts[t].scales[b..b + 8], &acts[t].scaled_sums[b..b + 8]);
                // SAFETY: u and ss are 8 values each.
                su[t] = _mm512_castps256_ps512(_mm256_mul_ps(dv, _mm256_loadu_ps(u.as_ptr())));
                acc.off[t] = _mm256_fmadd_ps(ov, _mm256_loadu_ps(ss.as_ptr()), acc.off[t]);
            }
            for (p, &pk) in pick.iter().enumerate() {
                let w0 = decode32::<TY>(&run[2 * p * bb..(2 * p + 1) * bb]);
                let w1 = decode32::<TY>(&run[(2 * p + 1) * bb..(2 * p + 2) * bb]);
                let w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
                let (ih, il) = idot64::<false, T>(w, acts, (b + 2 * p) * 32, false);
                for t in 0..T {
                    acc.add(t, ih[t], il[t], _mm512_permutexvar_ps(pk, su[t]));
                }
            }
            b += 8;
        }
        while b < nb {
            let w0 = decode32::<TY>(&row[b * bb..(b + 1) * bb]);
            let (d0, o0) = block_d_o::<TY>(row, bb, b);
            if b + 1 < nb {
                let w1 = decode32::<TY>(&row[(b + 1) * bb..(b + 2) * bb]);
                let (d1, o1) = block_d_o::<TY>(row, bb, b + 1);
                let w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
                let (ih, il) = idot64::<false, T>(w, acts, b * 32, false);
                for t in 0..T {
                    let (u, ss) = (acts[t].scales, acts[t].scaled_sums);
                    acc.add(t, ih[t], il[t], halves(d0 * u[b], d1 * u[b + 1]));
                    off[t] += o0 * ss[b] + o1 * ss[b + 1];
                }
            } else {
                let w = _mm512_zextsi256_si512(w0);
                let (ih, il) = idot64::<false, T>(w, acts, b * 32, true);
                for t in 0..T {
                    acc.add(t, ih[t], il[t], _mm512_set1_ps(d0 * acts[t].scales[b]));
                    off[t] += o0 * acts[t].scaled_sums[b];
                }
            }
            b += 2;
        }
        acc.finish(&off, out, i);
    }
}

/// Q4_K (Q5 false) and Q5_K (Q5 true): 64 values (two sub-blocks) per step, nibbles (and Q5_K's
/// fifth bit) as unsigned bytes; d * scale per sub-block, - dmin * min through the group sums.
///
/// # Safety
/// As for `row_dot_int`, with acts.len() == T and m.ty Q4_K / Q5_K as Q5 says.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q45_k_int<const Q5: bool, const T: usize>(
    m: &GgufMatRef,
    rows: Range<usize>,
    acts: &[ActRef],
    out: &mut [f32],
) {
    let (bb, qoff) = if Q5 { (176, 48) } else { (144, 16) };
    let mask = _mm256_set1_epi8(0x0F);
    let c16 = _mm512_set1_epi8(16);
    // Lanes 0..8 take element 2c of a vector of 8 sub-block values, lanes 8..16 element 2c + 1.
    let pick: [__m512i; 4] = std::array::from_fn(|c| {
        _mm512_mask_blend_epi32(
            0xFF00,
            _mm512_set1_epi32(2 * c as i32),
            _mm512_set1_epi32(2 * c as i32 + 1),
        )
    });
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = Acc::<T>::new();
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * bb..(b + 1) * bb];
            prefetch(blk.as_ptr());
            prefetch(blk.as_ptr().wrapping_add(64));
            let (d, dmin) = (half_f16c(blk, 0), half_f16c(blk, 2));
            let p = k_scales_mins_packed(&blk[4..16]);
            let v = _mm_setr_epi32(p[0] as i32, p[1] as i32, p[2] as i32, p[3] as i32);
            let scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
            let (dsc, dmn) = (
                _mm256_mul_ps(scales, _mm256_set1_ps(d)),
                _mm256_mul_ps(mins, _mm256_set1_ps(dmin)),
            );
            // Per token: d * scale * unit of the block's 8 sub-blocks; - dmin * min * group sum
            // into the offset accumulator.
            let mut su = [_mm512_setzero_ps(); T];
            for t in 0..T {
                let g0 = b * 8;
                let (u, ss) = (
                    &acts[t].scales[g0..g0 + 8],
                    &acts[t].scaled_sums[g0..g0 + 8],
                );
                // SAFETY: u and ss are 8 values each.
                let uv = _mm256_loadu_ps(u.as_ptr());
                su[t] = _mm512_castps256_ps512(_mm256_mul_ps(dsc, uv));
                acc.off[t] = _mm256_fnmadd_ps(dmn, _mm256_loadu_ps(ss.as_ptr()), acc.off[t]);
            }
            // SAFETY: Q5_K's qh is bytes 16..48 of the block; both halves get all 32 bytes.
            let qh = if Q5 {
                _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.as_ptr().add(16) as *const __m256i))
            } else {
                _mm512_setzero_si512()
            };
            for (c, &pk) in pick.iter().enumerate() {
                // SAFETY: bytes qoff + 32c .. qoff + 32c + 32 lie inside the block.
                let raw = _mm256_loadu_si256(blk.as_ptr().add(qoff + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(raw, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                let mut w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                if Q5 {
                    // Value 32sb + j's fifth bit is bit sb of qh[j] (sb = 2c below, 2c + 1 above).
                    let bits = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_set1_epi8((1u8 << (2 * c)) as i8)),
                        _mm256_set1_epi8((1u8 << (2 * c + 1)) as i8),
                        1,
                    );
                    let k = _mm512_test_epi8_mask(qh, bits);
                    w = _mm512_mask_add_epi8(w, k, w, c16);
                }
                let (ih, il) = idot64::<false, T>(w, acts, (b * 8 + 2 * c) * 32, false);
                for t in 0..T {
                    acc.add(t, ih[t], il[t], _mm512_permutexvar_ps(pk, su[t]));
                }
            }
        }
        acc.finish(&[0.0; T], out, i);
    }
}

/// Q6_K: 64 values per step as signed q - 32, the four 16-value sub-block scales applied per
/// 128-bit lane.
///
/// # Safety
/// As for `row_dot_int`, with acts.len() == T and m.ty Q6_K.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6_k_int<const T: usize>(
    m: &GgufMatRef,
    rows: Range<usize>,
    acts: &[ActRef],
    out: &mut [f32],
) {
    let m4 = _mm512_set1_epi8(0x0F);
    let m2 = _mm512_set1_epi8(0x03);
    let c32 = _mm512_set1_epi8(32);
    // Scale byte k of four to lanes 4k..4k+4.
    let spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = Acc::<T>::new();
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * 210..(b + 1) * 210];
            prefetch(blk.as_ptr());
            prefetch(blk.as_ptr().wrapping_add(64));
            prefetch(blk.as_ptr().wrapping_add(128));
            let d = _mm512_set1_ps(half_f16c(blk, 208));
            let sc = &blk[192..208];
            for h in 0..2 {
                // SAFETY: ql bytes 64h .. 64h + 64 and qh bytes 128 + 32h .. 160 + 32h lie inside
                // the block.
                let ql = _mm512_loadu_si512(blk.as_ptr().add(64 * h) as *const _);
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    blk.as_ptr().add(128 + 32 * h) as *const __m256i
                ));
                for s in 0..2 {
                    // Values 128h + 64s + j: low 4 bits ql[64h + j] >> 4s; high 2 bits
                    // qh[32h + j % 32] >> (4s + 2 * (j / 32)).
                    let c = 2 * h + s;
                    let lo =
                        _mm512_and_si512(_mm512_srl_epi16(ql, _mm_cvtsi32_si128(4 * s as i32)), m4);
                    let cnt = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_set1_epi16(4 * s as i16)),
                        _mm256_set1_epi16(4 * s as i16 + 2),
                        1,
                    );
                    let hi = _mm512_and_si512(_mm512_srlv_epi16(qh, cnt), m2);
                    let w = _mm512_sub_epi8(_mm512_or_si512(lo, _mm512_slli_epi16(hi, 4)), c32);
                    let g = b * 8 + 2 * c;
                    let (ih, il) = idot64::<true, T>(w, acts, g * 32, false);
                    let s4 = i32::from_le_bytes([
                        sc[4 * c],
                        sc[4 * c + 1],
                        sc[4 * c + 2],
                        sc[4 * c + 3],
                    ]);
                    let sv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(
                        _mm_cvtsi32_si128(s4),
                        spread,
                    )));
                    let sv = _mm512_mul_ps(sv, d);
                    for t in 0..T {
                        let u = acts[t].scales;
                        acc.add(t, ih[t], il[t], _mm512_mul_ps(sv, halves(u[g], u[g + 1])));
                    }
                }
            }
        }
        acc.finish(&[0.0; T], out, i);
    }
}
