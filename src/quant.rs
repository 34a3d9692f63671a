//! Weight formats: symmetric INT8 / INT4 with one f32 scale per group of K, and their byte layout.
//!
//! One quantised matrix W [N, K] (N output rows, K input columns) is stored as
//!
//! ```text
//! offset 0                        weights: N rows x row_bytes (row_bytes = K for INT8, K/2 for INT4)
//! offset scales_offset (= align64(N * row_bytes))
//!                                 scales: N rows x (K / group) f32, little endian
//! total nbytes = scales_offset + align64(N * K / group * 4)
//! ```
//!
//! Stored values are unsigned with an offset: INT8 byte = q + 128 (q in -127..=127),
//! INT4 nibble = q + 8 (q in -7..=7). The real weight is `q * scale[row][k / group]`.
//! INT4 packs each block of 64 consecutive K values of a row into 32 bytes: byte j of the block
//! holds value j in its low nibble and value j + 32 in its high nibble, so one 32-byte load and
//! two masks give 64 values in order. K must be a multiple of 64 and of the group size.
//! `docs_cpu_formats.md` is the written form of this comment.

use std::ops::Range;

pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

pub fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Round to nearest (ties away from zero) without a libm call: x86-64's baseline has no SSE4.1
/// `roundss`, so `f32::round` would be a function call per value. Exact for |v| < 2^22.
#[inline(always)]
pub fn round_i32(v: f32) -> i32 {
    (v + 0.5f32.copysign(v)) as i32
}

/// Where the parts of one quantised matrix lie, a plain function of (N, K, bits, group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatLayout {
    pub n: usize,
    pub k: usize,
    pub bits: u32,
    pub group: usize,
}

impl MatLayout {
    pub fn new(n: usize, k: usize, bits: u32, group: usize) -> Result<MatLayout, String> {
        if bits != 4 && bits != 8 {
            return Err(format!("bits must be 4 or 8, got {bits}"));
        }
        if !GROUP_SIZES.contains(&group) {
            return Err(format!("group_size must be 32, 64 or 128, got {group}"));
        }
        if n == 0 || k == 0 {
            return Err(format!("matrix shape must be non-empty, got N={n} K={k}"));
        }
        if !k.is_multiple_of(64) || !k.is_multiple_of(group) {
            return Err(format!(
                "K={k} must be a multiple of 64 and of group_size={group} (pad the input dimension)"
            ));
        }
        Ok(MatLayout { n, k, bits, group })
    }
    pub fn row_bytes(&self) -> usize {
        self.k * self.bits as usize / 8
    }
    pub fn groups_per_row(&self) -> usize {
        self.k / self.group
    }
    pub fn weights_nbytes(&self) -> usize {
        self.n * self.row_bytes()
    }
    pub fn scales_offset(&self) -> usize {
        align_up(self.weights_nbytes(), 64)
    }
    pub fn scales_len(&self) -> usize {
        self.n * self.groups_per_row()
    }
    pub fn nbytes(&self) -> usize {
        self.scales_offset() + align_up(self.scales_len() * 4, 64)
    }
    /// The offset added to the signed value before storing (128 for INT8, 8 for INT4).
    pub fn offset(&self) -> i32 {
        if self.bits == 8 {
            128
        } else {
            8
        }
    }
    pub fn qmax(&self) -> f32 {
        if self.bits == 8 {
            127.0
        } else {
            7.0
        }
    }
}

/// A borrowed quantised matrix: packed weights and scales in the layout above.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub layout: MatLayout,
    pub weights: &'a [u8],
    pub scales: &'a [f32],
}

impl<'a> MatRef<'a> {
    pub fn new(layout: MatLayout, weights: &'a [u8], scales: &'a [f32]) -> Result<Self, String> {
        if weights.len() != layout.weights_nbytes() {
            return Err(format!(
                "packed weights have {} bytes, expected N*K*bits/8 = {}",
                weights.len(),
                layout.weights_nbytes()
            ));
        }
        if scales.len() != layout.scales_len() {
            return Err(format!(
                "scales have {} values, expected N*K/group_size = {}",
                scales.len(),
                layout.scales_len()
            ));
        }
        Ok(MatRef {
            layout,
            weights,
            scales,
        })
    }

    /// A view of a matrix stored as one block of `layout.nbytes()` bytes at `bytes`.
    pub fn from_block(layout: MatLayout, bytes: &'a [u8]) -> MatRef<'a> {
        assert!(bytes.len() >= layout.nbytes(), "matrix block too short");
        let so = layout.scales_offset();
        let sb = &bytes[so..so + layout.scales_len() * 4];
        assert!(
            (sb.as_ptr() as usize).is_multiple_of(4),
            "scales must be 4-byte aligned"
        );
        // SAFETY: `sb` is in bounds, 4-byte aligned (checked above), and every bit pattern is a
        // valid f32; the returned slice borrows `bytes` for the same lifetime.
        let scales =
            unsafe { std::slice::from_raw_parts(sb.as_ptr() as *const f32, layout.scales_len()) };
        MatRef {
            layout,
            weights: &bytes[..layout.weights_nbytes()],
            scales,
        }
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.layout.row_bytes();
        &self.weights[r * rb..(r + 1) * rb]
    }
    pub fn row_scales(&self, r: usize) -> &'a [f32] {
        let g = self.layout.groups_per_row();
        &self.scales[r * g..(r + 1) * g]
    }
}

/// The signed value of element `i` of a packed row.
#[inline]
pub fn unpack(row: &[u8], bits: u32, i: usize) -> i32 {
    if bits == 8 {
        row[i] as i32 - 128
    } else {
        let (blk, j) = (i / 64, i % 64);
        let b = row[blk * 32 + (j % 32)];
        let nib = if j < 32 { b & 0x0F } else { b >> 4 };
        nib as i32 - 8
    }
}

/// Quantise rows `rows` of a float matrix `w` [N, K] (row-major) into `weights` / `scales`, which
/// hold exactly those rows (the caller slices them).
pub fn quantize_rows(
    layout: &MatLayout,
    w: &[f32],
    rows: Range<usize>,
    weights: &mut [u8],
    scales: &mut [f32],
) {
    let (k, g, rb, gpr) = (
        layout.k,
        layout.group,
        layout.row_bytes(),
        layout.groups_per_row(),
    );
    let qmax = layout.qmax();
    let mut q = vec![0i32; k];
    for (ri, r) in rows.enumerate() {
        let src = &w[r * k..(r + 1) * k];
        for gi in 0..gpr {
            let part = &src[gi * g..(gi + 1) * g];
            let amax = part.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = amax / qmax;
            scales[ri * gpr + gi] = s;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            for (j, v) in part.iter().enumerate() {
                q[gi * g + j] = round_i32(v * inv).clamp(-(qmax as i32), qmax as i32);
            }
        }
        let dst = &mut weights[ri * rb..(ri + 1) * rb];
        if layout.bits == 8 {
            for (d, v) in dst.iter_mut().zip(&q) {
                *d = (v + 128) as u8;
            }
        } else {
            for blk in 0..k / 64 {
                for j in 0..32 {
                    let lo = (q[blk * 64 + j] + 8) as u8;
                    let hi = (q[blk * 64 + j + 32] + 8) as u8;
                    dst[blk * 32 + j] = lo | (hi << 4);
                }
            }
        }
    }
}

/// Dequantise the whole matrix to f32 [N, K].
pub fn dequantize(m: &MatRef) -> Vec<f32> {
    let l = m.layout;
    let mut out = vec![0f32; l.n * l.k];
    for r in 0..l.n {
        let (row, sc) = (m.row(r), m.row_scales(r));
        for i in 0..l.k {
            out[r * l.k + i] = unpack(row, l.bits, i) as f32 * sc[i / l.group];
        }
    }
    out
}

/// Activations of T tokens quantised to INT8 in two terms per value, one f32 unit per group of
/// `group` values: x ~= unit * (254 * hi + lo), hi and lo in -127..=127. `hi` alone is the usual
/// per-group INT8 quantisation (unit * 254 = max|x| / 127); `lo` quantises its rounding error, so
/// the pair carries ~16 bits and the kernels' error stays ~1e-5 of the output instead of ~1e-2.
/// Kernels do one integer dot product per term and combine them as 254 * dot(hi) + dot(lo).
#[derive(Default)]
pub struct QuantActs {
    pub k: usize,
    pub group: usize,
    /// [T, K] high terms.
    pub hi: Vec<i8>,
    /// [T, K] low (residual) terms.
    pub lo: Vec<i8>,
    /// [T, K / group] units.
    pub scales: Vec<f32>,
    /// [T, K / group] unit * sum(254 * hi + lo) over the group: lets kernels that feed unsigned
    /// weights (q + offset) to u8 x i8 instructions remove the offset with one dot per row.
    pub scaled_sums: Vec<f32>,
}

/// One token's quantised activations.
#[derive(Clone, Copy)]
pub struct ActRef<'a> {
    pub hi: &'a [i8],
    pub lo: &'a [i8],
    pub scales: &'a [f32],
    pub scaled_sums: &'a [f32],
}

/// Multiplier of the high term.
pub const HI_WEIGHT: i32 = 254;

impl QuantActs {
    pub fn new(tokens: usize, k: usize, group: usize) -> QuantActs {
        let mut a = QuantActs::default();
        a.reshape(tokens, k, group);
        a
    }
    /// Make room for `tokens` tokens of `k` values in groups of `group`, keeping the buffers (no
    /// allocation once they are large enough, no zeroing but of new room): a token not set since
    /// holds stale values.
    pub fn reshape(&mut self, tokens: usize, k: usize, group: usize) {
        let g = k / group;
        (self.k, self.group) = (k, group);
        self.hi.resize(tokens * k, 0);
        self.lo.resize(tokens * k, 0);
        self.scales.resize(tokens * g, 0.0);
        self.scaled_sums.resize(tokens * g, 0.0);
    }
    pub fn tokens(&self) -> usize {
        self.hi.len() / self.k
    }
    pub fn token(&self, t: usize) -> ActRef<'_> {
        let g = self.k / self.group;
        ActRef {
            hi: &self.hi[t * self.k..(t + 1) * self.k],
            lo: &self.lo[t * self.k..(t + 1) * self.k],
            scales: &self.scales[t * g..(t + 1) * g],
            scaled_sums: &self.scaled_sums[t * g..(t + 1) * g],
        }
    }
    /// Quantise `x` (K values) as token `t`.
    pub fn set_token(&mut self, t: usize, x: &[f32]) {
        let (k, gs) = (self.k, self.group);
        let gpr = k / gs;
        quantize_act(
            x,
            gs,
            ActSlices {
                hi: &mut self.hi[t * k..(t + 1) * k],
                lo: &mut self.lo[t * k..(t + 1) * k],
                scales: &mut self.scales[t * gpr..(t + 1) * gpr],
                scaled_sums: &mut self.scaled_sums[t * gpr..(t + 1) * gpr],
            },
        );
    }
    pub fn from_rows(x: &[f32], k: usize, group: usize) -> QuantActs {
        let t = x.len() / k;
        let mut a = QuantActs::new(t, k, group);
        for i in 0..t {
            a.set_token(i, &x[i * k..(i + 1) * k]);
        }
        a
    }
}

/// Where one token's quantised activations go.
pub struct ActSlices<'a> {
    pub hi: &'a mut [i8],
    pub lo: &'a mut [i8],
    pub scales: &'a mut [f32],
    pub scaled_sums: &'a mut [f32],
}

/// Quantise one token's activations (see `QuantActs`) into `out`; AVX2 when the CPU has it.
pub fn quantize_act(x: &[f32], group: usize, out: ActSlices) {
    assert!(
        group.is_multiple_of(32) && x.len().is_multiple_of(group),
        "activations must be whole groups of 32k values"
    );
    assert!(out.hi.len() >= x.len() && out.lo.len() >= x.len());
    assert!(out.scales.len() >= x.len() / group && out.scaled_sums.len() >= x.len() / group);
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2+FMA checked just above; the asserts above give every length it reads
            // and writes.
            return unsafe { quantize_act_avx2(x, group, out) };
        }
    }
    quantize_act_scalar(x, group, out)
}

/// The scalar definition of `quantize_act`.
pub fn quantize_act_scalar(x: &[f32], group: usize, out: ActSlices) {
    for (gi, part) in x.chunks_exact(group).enumerate() {
        let amax = part.iter().fold(0f32, |m, v| m.max(v.abs()));
        let unit = amax / (127.0 * HI_WEIGHT as f32);
        let inv = if unit > 0.0 { 1.0 / unit } else { 0.0 };
        let mut sum = 0i64;
        for (j, v) in part.iter().enumerate() {
            let full = round_i32(v * inv).clamp(-127 * HI_WEIGHT, 127 * HI_WEIGHT); // in units
                                                                                    // hi = full / 254 rounded to nearest, so lo = full - 254 * hi lies in -127..=127.
            let hi = (full + if full >= 0 { 127 } else { -127 }) / HI_WEIGHT;
            let lo = full - HI_WEIGHT * hi;
            out.hi[gi * group + j] = hi as i8;
            out.lo[gi * group + j] = lo as i8;
            sum += (HI_WEIGHT * hi + lo) as i64;
        }
        out.scales[gi] = unit;
        out.scaled_sums[gi] = unit * sum as f32;
    }
}

/// AVX2 `quantize_act`: same units and same `254 * hi + lo` as the scalar version (at an exact
/// tie of full / 254 the split may differ, e.g. hi = 1, lo = -127 instead of hi = 0, lo = 127).
///
/// # Safety
/// AVX2+FMA present; the slice lengths checked in `quantize_act`; group a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_act_avx2(x: &[f32], group: usize, out: ActSlices) {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let half = _mm256_set1_ps(0.5);
    let lim = 127 * HI_WEIGHT;
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for gi in 0..x.len() / group {
        let base = x.as_ptr().add(gi * group);
        let mut m = _mm256_setzero_ps();
        for i in (0..group).step_by(8) {
            m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(base.add(i)), abs_mask));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
        let unit = amax / (127.0 * HI_WEIGHT as f32);
        let inv = _mm256_set1_ps(if unit > 0.0 { 1.0 / unit } else { 0.0 });
        let mut sum = _mm256_setzero_si256();
        for i in (0..group).step_by(32) {
            let mut his = [_mm256_setzero_si256(); 4];
            let mut los = [_mm256_setzero_si256(); 4];
            for q in 0..4 {
                let f = _mm256_mul_ps(_mm256_loadu_ps(base.add(i + 8 * q)), inv);
                // Round half away from zero: truncate f + copysign(0.5, f).
                let r = _mm256_add_ps(f, _mm256_or_ps(_mm256_and_ps(f, sign_mask), half));
                let full = _mm256_max_epi32(
                    _mm256_min_epi32(_mm256_cvttps_epi32(r), _mm256_set1_epi32(lim)),
                    _mm256_set1_epi32(-lim),
                );
                let fh = _mm256_mul_ps(
                    _mm256_cvtepi32_ps(full),
                    _mm256_set1_ps(1.0 / HI_WEIGHT as f32),
                );
                let rh = _mm256_add_ps(fh, _mm256_or_ps(_mm256_and_ps(fh, sign_mask), half));
                let hi = _mm256_max_epi32(
                    _mm256_min_epi32(_mm256_cvttps_epi32(rh), _mm256_set1_epi32(127)),
                    _mm256_set1_epi32(-127),
                );
                let lo =
                    _mm256_sub_epi32(full, _mm256_mullo_epi32(hi, _mm256_set1_epi32(HI_WEIGHT)));
                sum = _mm256_add_epi32(sum, full);
                his[q] = hi;
                los[q] = lo;
            }
            // Narrow 4 x 8 i32 to 32 i8 in order (the packs interleave 128-bit lanes; undo it).
            let pack = |v: [__m256i; 4]| {
                let b = _mm256_packs_epi16(
                    _mm256_packs_epi32(v[0], v[1]),
                    _mm256_packs_epi32(v[2], v[3]),
                );
                _mm256_permutevar8x32_epi32(b, order)
            };
            _mm256_storeu_si256(
                out.hi.as_mut_ptr().add(gi * group + i) as *mut __m256i,
                pack(his),
            );
            _mm256_storeu_si256(
                out.lo.as_mut_ptr().add(gi * group + i) as *mut __m256i,
                pack(los),
            );
        }
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
        out.scales[gi] = unit;
        out.scaled_sums[gi] = unit * total as f32;
    }
}

/// Convert IEEE half bits to f32.
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Convert bfloat16 bits to f32 (exact).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn act_terms_are_in_range_and_exact() {
        let mut rng = Rng::new(0);
        let x: Vec<f32> = rng.normal_vec(1024).iter().map(|v| v * 3.0).collect();
        let a = QuantActs::from_rows(&x, 1024, 64);
        for i in 0..1024 {
            let (hi, lo) = (a.hi[i] as i32, a.lo[i] as i32);
            assert!((-127..=127).contains(&hi) && (-127..=127).contains(&lo));
            let back = a.scales[i / 64] * (HI_WEIGHT * hi + lo) as f32;
            assert!((back - x[i]).abs() <= a.scales[i / 64] * 0.5001 + 1e-6);
        }
        assert_eq!(round_i32(2.5), 3);
        assert_eq!(round_i32(-2.5), -3);
        assert_eq!(round_i32(-0.2), 0);
    }

    #[test]
    fn simd_act_quantisation_matches_scalar() {
        let mut rng = Rng::new(0);
        for g in GROUP_SIZES {
            let mut x: Vec<f32> = rng.normal_vec(1024).iter().map(|v| v * 5.0).collect();
            x[3] = 0.0;
            x[70] = -x[71]; // ties and signs
            let (mut a, mut b) = (QuantActs::new(1, 1024, g), QuantActs::new(1, 1024, g));
            quantize_act(
                &x,
                g,
                ActSlices {
                    hi: &mut a.hi,
                    lo: &mut a.lo,
                    scales: &mut a.scales,
                    scaled_sums: &mut a.scaled_sums,
                },
            );
            quantize_act_scalar(
                &x,
                g,
                ActSlices {
                    hi: &mut b.hi,
                    lo: &mut b.lo,
                    scales: &mut b.scales,
                    scaled_sums: &mut b.scaled_sums,
                },
            );
            assert_eq!(a.scales, b.scales);
            for i in 0..1024 {
                let fa = HI_WEIGHT * a.hi[i] as i32 + a.lo[i] as i32;
                let fb = HI_WEIGHT * b.hi[i] as i32 + b.lo[i] as i32;
                assert_eq!(fa, fb, "value {i}");
                assert!(a.lo[i] != -128 && a.hi[i] != -128);
            }
            for (p, q) in a.scaled_sums.iter().zip(&b.scaled_sums) {
                assert!((p - q).abs() <= 1e-6 * q.abs().max(1.0));
            }
        }
    }

    #[test]
    fn layout_is_aligned_and_checked() {
        let l = MatLayout::new(1408, 2048, 4, 128).unwrap();
        assert_eq!(l.row_bytes(), 1024);
        assert_eq!(l.scales_offset() % 64, 0);
        assert_eq!(l.nbytes() % 64, 0);
        assert_eq!(l.nbytes(), 1408 * 1024 + 1408 * 16 * 4);
        assert!(MatLayout::new(4, 96, 4, 32).is_err());
        assert!(MatLayout::new(4, 128, 5, 32).is_err());
        assert!(MatLayout::new(4, 128, 8, 48).is_err());
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let mut rng = Rng::new(7);
        for bits in [4, 8] {
            for g in GROUP_SIZES {
                let l = MatLayout::new(5, 256, bits, g).unwrap();
                let w = rng.normal_vec(5 * 256);
                let mut qw = vec![0u8; l.weights_nbytes()];
                let mut sc = vec![0f32; l.scales_len()];
                quantize_rows(&l, &w, 0..5, &mut qw, &mut sc);
                let m = MatRef::new(l, &qw, &sc).unwrap();
                let d = dequantize(&m);
                for i in 0..w.len() {
                    let s = sc[i / g];
                    assert!(
                        (d[i] - w[i]).abs() <= s * 0.5001 + 1e-7,
                        "bits {bits} g {g} i {i}"
                    );
                }
            }
        }
    }
}
