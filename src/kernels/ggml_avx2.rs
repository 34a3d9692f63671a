//! AVX2+FMA kernels for GGUF weights with f32 activations. Q8_0, Q4_K and Q5_0 (llama.cpp's
//! fallback for Q4_K rows that are not a multiple of 256) unpack their blocks in registers; every other type dequantises each block with the scalar reference into a stack
//! buffer and does the dot products with FMA. Callers (kernels::gguf_row_dot_f32) check CPU
//! support and slice lengths.

use super::avx2::{hsum, prefetch};
use crate::ggml_quants::{dequantize_block, k_scale_min, GgmlType, GgufMatRef, MAX_BLOCK};
use crate::quant::f16_to_f32;
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
