//! AVX2+FMA kernels for GGUF weights.
//!
//! f32 activations (`row_dot_f32`): Q8_0, Q4_K and Q5_0 (llama.cpp's fallback for Q4_K rows that
//! are not a multiple of 256) unpack their blocks in registers; every other type dequantises each
//! block with the scalar reference into a stack buffer and does the dot products with FMA.
//!
//! INT8 activations (`row_dot_int`, two-term activations in groups of 32, see `quant::QuantActs`):
//! each 32 weights are unpacked to bytes in a register and dotted with both activation terms by
//! maddubs/madd (exact i32 per 32 values); one FMA per 32 values applies the block's scale times
//! the activation unit. Unsigned weights (Q4_0/1, Q5_0/1, Q4_K, Q5_K) feed maddubs as stored and
//! their offset or minimum is applied per 32 values through the activation group sums; signed
//! weights (Q8_0, Q6_K) give maddubs |q| and move q's sign onto the activations.
//!
//! Callers (kernels::gguf_row_dot_*) check CPU support and slice lengths.

use super::avx2::{hsum, prefetch};
use crate::ggml_quants::{dequantize_block, k_scale_min, GgmlType, GgufMatRef, MAX_BLOCK};
use crate::quant::{f16_to_f32, ActRef, HI_WEIGHT};
use std::arch::x86_64::*;
use std::ops::Range;

fn half(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// # Safety
/// AVX2+FMA present; the rows exist; `out` holds rows.len() * xs.len() values; each x has >= K values;
/// 1 <= xs.len() <= MAX_TOKENS.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_dot_f32(m: &GgufMatRef, rows: Range<usize>, xs: &[&[f32]], out: &mut [f32]) {
    macro_rules! go {
        ($f:ident) => {
            match xs.len() {
                1 => $f::<1>(m, rows, xs, out),
                2 => $f::<2>(m, rows, xs, out),
                3 => $f::<3>(m, rows, xs, out),
                _ => $f::<4>(m, rows, xs, out),
            }
        };
    }
    match m.ty {
        GgmlType::Q8_0 => go!(q8_0),
        GgmlType::Q4K => go!(q4_k),
        GgmlType::Q5_0 => go!(q5_0),
        _ => go!(generic),
    }
}

/// Store the T accumulators' sums as row `i` of `out`.
#[target_feature(enable = "avx2,fma")]
fn finish<const T: usize>(acc: &[__m256; T], out: &mut [f32], i: usize) {
    for t in 0..T {
        out[i * T + t] = hsum(acc[t]);
    }
}

/// # Safety
/// As for `row_dot_f32`, with xs.len() == T.
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0<const T: usize>(m: &GgufMatRef, rows: Range<usize>, xs: &[&[f32]], out: &mut [f32]) {
    let xp: [*const f32; T] = std::array::from_fn(|t| xs[t].as_ptr());
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * 34..(b + 1) * 34];
            prefetch(blk.as_ptr());
            let d = _mm256_set1_ps(half(blk, 0));
            for c in 0..4 {
                // SAFETY: bytes 2 + 8c .. 10 + 8c lie inside the 34-byte block.
                let q = _mm_loadl_epi64(blk.as_ptr().add(2 + 8 * c) as *const __m128i);
                let w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
                for t in 0..T {
                    // SAFETY: each x holds >= K = blocks * 32 values (checked by the caller).
                    let x = _mm256_loadu_ps(xp[t].add(b * 32 + 8 * c));
                    acc[t] = _mm256_fmadd_ps(w, x, acc[t]);
                }
            }
        }
        finish(&acc, out, i);
    }
}

/// # Safety
/// As for `row_dot_f32`, with xs.len() == T.
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_k<const T: usize>(m: &GgufMatRef, rows: Range<usize>, xs: &[&[f32]], out: &mut [f32]) {
    let xp: [*const f32; T] = std::array::from_fn(|t| xs[t].as_ptr());
    let mask = _mm256_set1_epi8(0x0F);
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * 144..(b + 1) * 144];
            prefetch(blk.as_ptr());
            let (d, dmin, sc) = (half(blk, 0), half(blk, 2), &blk[4..16]);
            for c in 0..4 {
                // SAFETY: bytes 16 + 32c .. 48 + 32c lie inside the 144-byte block.
                let raw = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * c) as *const __m256i);
                let nib = [
                    _mm256_and_si256(raw, mask),
                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask),
                ];
                for (s, q) in nib.iter().enumerate() {
                    let sb = 2 * c + s;
                    let (scale, min) = k_scale_min(sc, sb);
                    let ds = _mm256_set1_ps(d * scale as f32);
                    let dm = _mm256_set1_ps(dmin * min as f32);
                    let halves = [_mm256_castsi256_si128(*q), _mm256_extracti128_si256(*q, 1)];
                    for (hh, v) in halves.iter().enumerate() {
                        for e in 0..2 {
                            let q8 = if e == 0 { *v } else { _mm_srli_si128(*v, 8) };
                            let w = _mm256_fmsub_ps(
                                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8)),
                                ds,
                                dm,
                            );
                            let off = b * 256 + 32 * sb + 16 * hh + 8 * e;
                            for t in 0..T {
                                // SAFETY: off + 8 <= K and each x holds >= K values.
                                let x = _mm256_loadu_ps(xp[t].add(off));
                                acc[t] = _mm256_fmadd_ps(w, x, acc[t]);
                            }
                        }
                    }
                }
            }
        }
        finish(&acc, out, i);
    }
}

/// # Safety
/// As for `row_dot_f32`, with xs.len() == T.
#[target_feature(enable = "avx2,fma")]
unsafe fn q5_0<const T: usize>(m: &GgufMatRef, rows: Range<usize>, xs: &[&[f32]], out: &mut [f32]) {
    let xp: [*const f32; T] = std::array::from_fn(|t| xs[t].as_ptr());
    let m4 = _mm_set1_epi8(0x0F);
    // Byte j of the 32 gets byte j / 8 of qh (each 128-bit lane holds qh's 4 bytes), then keeps
    // bit j % 8: value j's fifth bit.
    let pick = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let (b16, c16) = (_mm256_set1_epi8(0x10), _mm256_set1_epi8(16));
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * 22..(b + 1) * 22];
            prefetch(blk.as_ptr());
            let d = _mm256_set1_ps(half(blk, 0));
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            // SAFETY: bytes 6..22 (16) lie inside the 22-byte block.
            let qs = _mm_loadu_si128(blk.as_ptr().add(6) as *const __m128i);
            let lo = _mm_and_si128(qs, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
            let nib = _mm256_set_m128i(hi, lo); // values 0..16 low lane, 16..32 high lane
            let hb = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), pick), bit);
            let hb = _mm256_and_si256(_mm256_cmpeq_epi8(hb, bit), b16);
            let q = _mm256_sub_epi8(_mm256_or_si256(nib, hb), c16); // -16..=15 as i8
            let halves = [_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)];
            for (hh, v) in halves.iter().enumerate() {
                for e in 0..2 {
                    let q8 = if e == 0 { *v } else { _mm_srli_si128(*v, 8) };
                    let w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), d);
                    let off = b * 32 + 16 * hh + 8 * e;
                    for t in 0..T {
                        // SAFETY: off + 8 <= K and each x holds >= K values.
                        let x = _mm256_loadu_ps(xp[t].add(off));
                        acc[t] = _mm256_fmadd_ps(w, x, acc[t]);
                    }
                }
            }
        }
        finish(&acc, out, i);
    }
}

/// Any type: scalar block dequantisation, FMA dot products.
///
/// # Safety
/// As for `row_dot_f32`, with xs.len() == T.
#[target_feature(enable = "avx2,fma")]
unsafe fn generic<const T: usize>(
    m: &GgufMatRef,
    rows: Range<usize>,
    xs: &[&[f32]],
    out: &mut [f32],
) {
    let xp: [*const f32; T] = std::array::from_fn(|t| xs[t].as_ptr());
    let (bs, bb) = (m.ty.block_size(), m.ty.block_bytes());
    let mut buf = [0f32; MAX_BLOCK];
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * bb..(b + 1) * bb];
            prefetch(blk.as_ptr());
            dequantize_block(m.ty, blk, &mut buf);
            for j in (0..bs).step_by(8) {
                // SAFETY: j + 8 <= bs <= MAX_BLOCK.
                let w = _mm256_loadu_ps(buf.as_ptr().add(j));
                for t in 0..T {
                    // SAFETY: b * bs + j + 8 <= K and each x holds >= K values.
                    let x = _mm256_loadu_ps(xp[t].add(b * bs + j));
                    acc[t] = _mm256_fmadd_ps(w, x, acc[t]);
                }
            }
        }
        finish(&acc, out, i);
    }
}

/// # Safety
/// AVX2+FMA present; the rows exist; `out` holds rows.len() * acts.len() values; each activation
/// has >= K values in hi and lo and >= K / 32 units and group sums; 1 <= acts.len() <= MAX_TOKENS;
/// `m.ty.has_int_kernel()`.
#[target_feature(enable = "avx2,fma")]
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
        GgmlType::Q8_0 => go!(q8_0_int),
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

/// GGML type ids of the 32-value types `decode32` unpacks (const generic arguments).
pub(super) const ID_Q4_0: u32 = 2;
pub(super) const ID_Q4_1: u32 = 3;
pub(super) const ID_Q5_0: u32 = 6;
pub(super) const ID_Q5_1: u32 = 7;
pub(super) const ID_Q8_0: u32 = 8;

/// The offset o of a 32-value block (`TY` one of the ID_ constants) whose `decode32` bytes w give
/// value j = d * w[j] + o; `m` is the block's minimum field (Q4_1, Q5_1; ignored otherwise).
#[inline(always)]
pub(super) fn block_offset<const TY: u32>(d: f32, m: f32) -> f32 {
    match TY {
        ID_Q8_0 => -128.0 * d,
        ID_Q4_0 => -8.0 * d,
        ID_Q5_0 => -16.0 * d,
        _ => m,
    }
}

/// The 32 values of a 32-value block (`TY` one of the ID_ constants) as unsigned bytes w
/// (value j = d * w[j] + block_offset). Q8_0's w is q + 128 (up to 255: for u8 x i8 instructions
/// that do not saturate, i.e. vpdpbusd, not maddubs).
///
/// # Safety
/// AVX2 present; `blk` holds the block's bytes (checked by the slice indexes below).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn decode32<const TY: u32>(blk: &[u8]) -> __m256i {
    let m4 = _mm_set1_epi8(0x0F);
    match TY {
        ID_Q8_0 => {
            let q = &blk[2..34];
            // SAFETY: q is 32 bytes.
            let w = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
            _mm256_xor_si256(w, _mm256_set1_epi8(-128))
        }
        ID_Q4_0 | ID_Q4_1 => {
            let qs = if TY == ID_Q4_0 {
                &blk[2..18]
            } else {
                &blk[4..20]
            };
            // SAFETY: qs is 16 bytes.
            let v = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
            let lo = _mm_and_si128(v, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
            _mm256_set_m128i(hi, lo)
        }
        _ => {
            let hoff = if TY == ID_Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes([blk[hoff], blk[hoff + 1], blk[hoff + 2], blk[hoff + 3]]);
            let qs = &blk[hoff + 4..hoff + 20];
            // SAFETY: qs is 16 bytes.
            let v = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
            let lo = _mm_and_si128(v, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
            // Byte j gets byte j / 8 of qh (each 128-bit lane holds qh's 4 bytes), then keeps
            // bit j % 8: value j's fifth bit, moved to 0x10.
            let pick = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let hb = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), pick), bit);
            let hb = _mm256_and_si256(_mm256_cmpeq_epi8(hb, bit), _mm256_set1_epi8(0x10));
            _mm256_or_si256(_mm256_set_m128i(hi, lo), hb)
        }
    }
}

/// Whether the 32-value type `TY` has a minimum field at byte 2 (Q4_1, Q5_1).
pub(super) const fn has_min(ty: u32) -> bool {
    ty == ID_Q4_1 || ty == ID_Q5_1
}

/// Per token t: 254 * dot(w, hi_t[e..e+32]) + dot(w, lo_t[e..e+32]) as 8 i32 lanes (lane k sums
/// values 4k..4k+4). SIGNED: w is signed (-128..=127); |w| is maddubs' unsigned operand and w's
/// sign moves onto the activations, so pair sums stay within 2 * 128 * 127 < 32768. Else w is
/// unsigned and at most 63 (2 * 63 * 127 < 32768). So maddubs never saturates.
///
/// # Safety
/// AVX2 present; acts.len() >= T and every act's hi and lo hold >= e + 32 values.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn idot32<const SIGNED: bool, const T: usize>(
    w: __m256i,
    acts: &[ActRef],
    e: usize,
) -> [__m256i; T] {
    let wu = if SIGNED { _mm256_abs_epi8(w) } else { w };
    let c254 = _mm256_set1_epi16(HI_WEIGHT as i16);
    let ones = _mm256_set1_epi16(1);
    let mut r = [_mm256_setzero_si256(); T];
    for t in 0..T {
        // SAFETY: e + 32 <= len of hi and lo (caller).
        let mut xh = _mm256_loadu_si256(acts[t].hi.as_ptr().add(e) as *const __m256i);
        let mut xl = _mm256_loadu_si256(acts[t].lo.as_ptr().add(e) as *const __m256i);
        if SIGNED {
            xh = _mm256_sign_epi8(xh, w);
            xl = _mm256_sign_epi8(xl, w);
        }
        let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xh), c254);
        let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xl), ones);
        r[t] = _mm256_add_epi32(ph, pl);
    }
    r
}

/// out[i * T + t] = sum of acc[t]'s lanes + off[t].
#[target_feature(enable = "avx2,fma")]
fn finish_off<const T: usize>(acc: &[__m256; T], off: &[f32; T], out: &mut [f32], i: usize) {
    for t in 0..T {
        out[i * T + t] = hsum(acc[t]) + off[t];
    }
}

/// Q8_0, INT8 activations (signed weights: no offset term).
///
/// # Safety
/// As for `row_dot_int`, with acts.len() == T.
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_int<const T: usize>(
    m: &GgufMatRef,
    rows: Range<usize>,
    acts: &[ActRef],
    out: &mut [f32],
) {
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * 34..(b + 1) * 34];
            prefetch(blk.as_ptr());
            let d = half(blk, 0);
            // SAFETY: bytes 2..34 lie inside the block; b * 32 + 32 <= K.
            let w = _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i);
            let p = idot32::<true, T>(w, acts, b * 32);
            for t in 0..T {
                let s = _mm256_set1_ps(d * acts[t].scales[b]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[t]), s, acc[t]);
            }
        }
        finish(&acc, out, i);
    }
}

/// Q4_0, Q4_1, Q5_0, Q5_1 (`TY`), INT8 activations: unsigned weights, the offset applied per
/// block through the activation group sums.
///
/// # Safety
/// As for `row_dot_int`, with acts.len() == T and m.ty matching TY.
#[target_feature(enable = "avx2,fma")]
unsafe fn blocks32_int<const TY: u32, const T: usize>(
    m: &GgufMatRef,
    rows: Range<usize>,
    acts: &[ActRef],
    out: &mut [f32],
) {
    let bb = m.ty.block_bytes();
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = [_mm256_setzero_ps(); T];
        let mut off = [0f32; T];
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * bb..(b + 1) * bb];
            prefetch(blk.as_ptr());
            let d = half(blk, 0);
            let o = block_offset::<TY>(d, if has_min(TY) { half(blk, 2) } else { 0.0 });
            let w = decode32::<TY>(blk);
            let p = idot32::<false, T>(w, acts, b * 32);
            for t in 0..T {
                let s = _mm256_set1_ps(d * acts[t].scales[b]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[t]), s, acc[t]);
                off[t] += o * acts[t].scaled_sums[b];
            }
        }
        finish_off(&acc, &off, out, i);
    }
}

/// Q4_K (Q5 false) and Q5_K (Q5 true), INT8 activations: nibbles (and Q5_K's fifth bit) as
/// unsigned bytes per 32-value sub-block; d * scale per sub-block, - dmin * min through the
/// activation group sums.
///
/// # Safety
/// As for `row_dot_int`, with acts.len() == T and m.ty Q4_K / Q5_K as Q5 says.
#[target_feature(enable = "avx2,fma")]
unsafe fn q45_k_int<const Q5: bool, const T: usize>(
    m: &GgufMatRef,
    rows: Range<usize>,
    acts: &[ActRef],
    out: &mut [f32],
) {
    let (bb, qoff) = if Q5 { (176, 48) } else { (144, 16) };
    let mask = _mm256_set1_epi8(0x0F);
    let b16 = _mm256_set1_epi8(0x10);
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = [_mm256_setzero_ps(); T];
        let mut off = [0f32; T];
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * bb..(b + 1) * bb];
            prefetch(blk.as_ptr());
            prefetch(blk.as_ptr().wrapping_add(64));
            let (d, dmin, sc) = (half(blk, 0), half(blk, 2), &blk[4..16]);
            // SAFETY: Q5_K's qh is bytes 16..48 of the block.
            let qh = if Q5 {
                _mm256_loadu_si256(blk.as_ptr().add(16) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            for c in 0..4 {
                // SAFETY: bytes qoff + 32c .. qoff + 32c + 32 lie inside the block.
                let raw = _mm256_loadu_si256(blk.as_ptr().add(qoff + 32 * c) as *const __m256i);
                let nib = [
                    _mm256_and_si256(raw, mask),
                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask),
                ];
                for (s, &n) in nib.iter().enumerate() {
                    let sb = 2 * c + s;
                    let w = if Q5 {
                        let bit = _mm256_set1_epi8((1u8 << sb) as i8);
                        let hb = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                        _mm256_or_si256(n, _mm256_and_si256(hb, b16))
                    } else {
                        n
                    };
                    let (scale, mn) = k_scale_min(sc, sb);
                    let (ds, dm) = (d * scale as f32, dmin * mn as f32);
                    let g = b * 8 + sb;
                    let p = idot32::<false, T>(w, acts, g * 32);
                    for t in 0..T {
                        let s = _mm256_set1_ps(ds * acts[t].scales[g]);
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[t]), s, acc[t]);
                        off[t] -= dm * acts[t].scaled_sums[g];
                    }
                }
            }
        }
        finish_off(&acc, &off, out, i);
    }
}

/// Q6_K, INT8 activations: q - 32 as signed bytes per 32 values, the two 16-value sub-block scales
/// applied per 128-bit lane.
///
/// # Safety
/// As for `row_dot_int`, with acts.len() == T and m.ty Q6_K.
#[target_feature(enable = "avx2,fma")]
unsafe fn q6_k_int<const T: usize>(
    m: &GgufMatRef,
    rows: Range<usize>,
    acts: &[ActRef],
    out: &mut [f32],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    let c32 = _mm256_set1_epi8(32);
    for (i, r) in rows.enumerate() {
        let row = m.row(r);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..m.blocks_per_row() {
            let blk = &row[b * 210..(b + 1) * 210];
            prefetch(blk.as_ptr());
            prefetch(blk.as_ptr().wrapping_add(64));
            prefetch(blk.as_ptr().wrapping_add(128));
            let d = half(blk, 208);
            let sc = &blk[192..208];
            for h in 0..2 {
                // SAFETY: qh of this half is bytes 128 + 32h .. 160 + 32h of the block.
                let qh = _mm256_loadu_si256(blk.as_ptr().add(128 + 32 * h) as *const __m256i);
                for rr in 0..4 {
                    // Values 128h + 32rr + j: low 4 bits from ql[64h + 32(rr % 2) + j] >> 4(rr / 2),
                    // high 2 bits from qh[32h + j] >> 2rr.
                    // SAFETY: ql bytes 64h + 32(rr % 2) .. +32 lie inside the block's first 128.
                    let ql = _mm256_loadu_si256(
                        blk.as_ptr().add(64 * h + 32 * (rr % 2)) as *const __m256i
                    );
                    let lo = _mm256_and_si256(
                        _mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (rr / 2) as i32)),
                        m4,
                    );
                    let hi = _mm256_and_si256(
                        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * rr as i32)),
                        m2,
                    );
                    let w = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), c32);
                    let q = 4 * h + rr;
                    let g = b * 8 + q;
                    let p = idot32::<true, T>(w, acts, g * 32);
                    let sv = _mm256_set_m128(
                        _mm_set1_ps(d * (sc[2 * q + 1] as i8) as f32),
                        _mm_set1_ps(d * (sc[2 * q] as i8) as f32),
                    );
                    for t in 0..T {
                        let s = _mm256_mul_ps(sv, _mm256_set1_ps(acts[t].scales[g]));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[t]), s, acc[t]);
                    }
                }
            }
        }
        finish(&acc, out, i);
    }
}
