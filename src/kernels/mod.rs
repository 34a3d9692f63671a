//! Row dot-product kernels over quantised matrices, one module per SIMD path, and the one place
//! that dispatches between them. A kernel computes a range of rows of W, each against up to
//! `MAX_TOKENS` tokens at once, so each weight byte is unpacked once per token block; the output
//! is out[(r - rows.start) * T + t].
//!
//! Two activation modes: INT8 activations (per-group scales, integer dot products: VNNI on
//! AVX-512, maddubs/madd on AVX2) and f32 activations (weights widened to f32, FMA).

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod ggml_avx2;
#[cfg(target_arch = "x86_64")]
pub mod ggml_avx512;
pub mod ggml_scalar;
pub mod scalar;

use crate::ggml_quants::GgufMatRef;
use crate::quant::{ActRef, MatRef};
use crate::simd::SimdPath;
use std::ops::Range;

/// The most tokens one kernel call handles.
pub const MAX_TOKENS: usize = 4;

/// How far ahead of the weight being read the SIMD kernels prefetch (bytes).
pub const PREFETCH_BYTES: usize = 4096;

/// Rows per kernel call in the drivers: small enough that a tile of rows stays in L1/L2 while
/// every token block passes over it, large enough to amortise the call.
pub const ROW_TILE: usize = 16;

/// `rows` cut into consecutive tiles of at most `tile` rows (`ROW_TILE` but where the token blocks
/// are narrower than MAX_TOKENS).
pub fn row_tiles(rows: Range<usize>, tile: usize) -> impl Iterator<Item = Range<usize>> {
    rows.clone()
        .step_by(tile)
        .map(move |s| s..(s + tile).min(rows.end))
}

fn check_int(m: &MatRef, r: &Range<usize>, acts: &[ActRef], out: &[f32]) {
    let l = m.layout;
    assert!(
        r.start <= r.end && r.end <= l.n,
        "rows {r:?} out of range (N={})",
        l.n
    );
    assert!(!acts.is_empty() && acts.len() <= MAX_TOKENS && out.len() >= acts.len() * r.len());
    for a in acts {
        assert!(
            a.hi.len() >= l.k
                && a.lo.len() >= l.k
                && a.scales.len() >= l.groups_per_row()
                && a.scaled_sums.len() >= l.groups_per_row()
        );
    }
}

/// Rows `r` of an [n, k] matrix exist, and the f32 activations and the output are long enough.
fn check_f32(n: usize, k: usize, r: &Range<usize>, xs: &[&[f32]], out: &[f32]) {
    assert!(
        r.start <= r.end && r.end <= n,
        "rows {r:?} out of range (N={n})"
    );
    assert!(!xs.is_empty() && xs.len() <= MAX_TOKENS && out.len() >= xs.len() * r.len());
    for x in xs {
        assert!(x.len() >= k);
    }
}

/// out[(r - rows.start) * T + t] = W[r] . act[t] for INT8-quantised activations (group size must
/// equal the matrix's), r in `rows`.
pub fn row_dot_int(path: SimdPath, m: &MatRef, r: Range<usize>, acts: &[ActRef], out: &mut [f32]) {
    check_int(m, &r, acts, out);
    match path {
        SimdPath::Scalar => scalar::row_dot_int(m, r, acts, out),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => {
            assert!(path.supported(), "CPU lacks AVX2+FMA");
            // SAFETY: the CPU supports AVX2+FMA (asserted above) and check_int verified that the
            // rows exist and every activation slice holds at least K values / K/group groups, which
            // is all the kernel reads.
            unsafe { avx2::row_dot_int(m, r, acts, out) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => {
            assert!(path.supported(), "CPU lacks AVX-512 F/BW/VL/VNNI");
            // SAFETY: as for AVX2, with the AVX-512 features asserted above.
            unsafe { avx512::row_dot_int(m, r, acts, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::row_dot_int(m, r, acts, out),
    }
}

/// out[(r - rows.start) * T + t] = W[r] . x[t] for f32 activations, r in `rows`.
pub fn row_dot_f32(path: SimdPath, m: &MatRef, r: Range<usize>, xs: &[&[f32]], out: &mut [f32]) {
    check_f32(m.layout.n, m.layout.k, &r, xs, out);
    match path {
        SimdPath::Scalar => scalar::row_dot_f32(m, r, xs, out),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => {
            assert!(path.supported(), "CPU lacks AVX2+FMA");
            // SAFETY: CPU support asserted; check_f32 verified the rows exist and each x has >= K values.
            unsafe { avx2::row_dot_f32(m, r, xs, out) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => {
            assert!(path.supported(), "CPU lacks AVX-512 F/BW/VL/VNNI");
            // SAFETY: CPU support asserted; check_f32 verified the rows exist and each x has >= K values.
            unsafe { avx512::row_dot_f32(m, r, xs, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::row_dot_f32(m, r, xs, out),
    }
}

/// out[(r - rows.start) * T + t] = W[r] . x[t] for a GGUF weight (its blocks as stored) and f32
/// activations. The AVX-512 path runs the AVX2 kernels (the AVX-512 GGUF kernels are INT8 only).
pub fn gguf_row_dot_f32(
    path: SimdPath,
    m: &GgufMatRef,
    r: Range<usize>,
    xs: &[&[f32]],
    out: &mut [f32],
) {
    check_f32(m.n, m.k, &r, xs, out);
    match path {
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 | SimdPath::Avx512 => {
            assert!(SimdPath::Avx2.supported(), "CPU lacks AVX2+FMA");
            // SAFETY: AVX2+FMA support asserted; the asserts above checked the rows exist,
            // 1..=MAX_TOKENS tokens each of >= K values, and room in `out`.
            unsafe { ggml_avx2::row_dot_f32(m, r, xs, out) }
        }
        _ => ggml_scalar::row_dot_f32(m, r, xs, out),
    }
}

/// out[(r - rows.start) * T + t] = W[r] . act[t] for a GGUF weight (its blocks as stored) and
/// INT8 activations quantised in groups of `ggml_quants::ACT_GROUP` (integer dot products). Types
/// without an integer kernel (`!has_int_kernel()`, not reached through `weight_row_dot`) run the
/// scalar reference on every path.
pub fn gguf_row_dot_int(
    path: SimdPath,
    m: &GgufMatRef,
    r: Range<usize>,
    acts: &[ActRef],
    out: &mut [f32],
) {
    let groups = m.k / crate::ggml_quants::ACT_GROUP;
    assert!(
        r.start <= r.end && r.end <= m.n,
        "rows {r:?} out of range (N={})",
        m.n
    );
    assert!(!acts.is_empty() && acts.len() <= MAX_TOKENS && out.len() >= acts.len() * r.len());
    for a in acts {
        assert!(
            a.hi.len() >= m.k && a.lo.len() >= m.k,
            "activations shorter than K={}",
            m.k
        );
        assert!(
            a.scales.len() == groups && a.scaled_sums.len() == groups,
            "GGUF INT8 activations must be quantised in groups of {}",
            crate::ggml_quants::ACT_GROUP
        );
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => {
            assert!(path.supported(), "CPU lacks AVX2+FMA");
            // SAFETY: AVX2+FMA support asserted; the asserts above checked the rows exist,
            // 1..=MAX_TOKENS tokens each of >= K values and K / 32 groups, and room in `out`.
            unsafe { ggml_avx2::row_dot_int(m, r, acts, out) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => {
            assert!(path.supported(), "CPU lacks AVX-512 F/BW/VL/VNNI");
            // SAFETY: as for AVX2, with the AVX-512 features asserted above.
            unsafe { ggml_avx512::row_dot_int(m, r, acts, out) }
        }
        _ => ggml_scalar::row_dot_int(m, r, acts, out),
    }
}

/// A weight matrix in either Krasis's own INT4/INT8 layout or a GGUF block format read in place.
#[derive(Clone, Copy)]
pub enum WeightRef<'a> {
    Krasis(MatRef<'a>),
    Gguf(GgufMatRef<'a>),
}

impl WeightRef<'_> {
    /// The activation group size for INT8 activations (GGUF: `ggml_quants::ACT_GROUP`; a GGUF
    /// type without an integer kernel then takes the f32 activations, which callers always pass).
    pub fn int_group(&self) -> Option<usize> {
        match self {
            WeightRef::Krasis(m) => Some(m.layout.group),
            WeightRef::Gguf(_) => Some(crate::ggml_quants::ACT_GROUP),
        }
    }
    /// The Krasis matrix, if this is one.
    pub fn krasis(&self) -> Option<&MatRef<'_>> {
        match self {
            WeightRef::Krasis(m) => Some(m),
            WeightRef::Gguf(_) => None,
        }
    }
    /// The bytes rows `r` of the matrix are read from: (packed weights, scales as bytes; a GGUF matrix's
    /// blocks, and nothing).
    pub fn row_bytes(&self, r: Range<usize>) -> [&[u8]; 2] {
        match self {
            WeightRef::Krasis(m) => {
                let (rb, g) = (m.layout.row_bytes(), m.layout.groups_per_row());
                let scales = &m.scales[r.start * g..r.end * g];
                // SAFETY: any f32 slice is a valid, equally long-lived byte slice of 4x its length.
                let scales = unsafe {
                    std::slice::from_raw_parts(
                        scales.as_ptr() as *const u8,
                        std::mem::size_of_val(scales),
                    )
                };
                [&m.weights[r.start * rb..r.end * rb], scales]
            }
            WeightRef::Gguf(g) => {
                let rb = g.data.len() / g.n.max(1);
                [&g.data[r.start * rb..r.end * rb], &[]]
            }
        }
    }
    /// (N, K).
    pub fn shape(&self) -> (usize, usize) {
        match self {
            WeightRef::Krasis(m) => (m.layout.n, m.layout.k),
            WeightRef::Gguf(g) => (g.n, g.k),
        }
    }
    /// The whole matrix as f32 [N, K] (reference / tests).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            WeightRef::Krasis(m) => crate::quant::dequantize(m),
            WeightRef::Gguf(g) => crate::ggml_quants::dequantize(g),
        }
    }
}

/// One kernel call on either kind of weight: INT8 activations `acts` when `act_int8` and the
/// weight is a Krasis matrix or a GGUF type with an integer kernel, else f32 activations `xs`.
pub fn weight_row_dot(
    path: SimdPath,
    w: &WeightRef,
    r: Range<usize>,
    acts: &[ActRef],
    xs: &[&[f32]],
    act_int8: bool,
    out: &mut [f32],
) {
    match w {
        WeightRef::Krasis(m) if act_int8 => row_dot_int(path, m, r, acts, out),
        WeightRef::Krasis(m) => row_dot_f32(path, m, r, xs, out),
        WeightRef::Gguf(g) if act_int8 && g.ty.has_int_kernel() => {
            gguf_row_dot_int(path, g, r, acts, out)
        }
        WeightRef::Gguf(g) => gguf_row_dot_f32(path, g, r, xs, out),
    }
}

/// Expands to a match on a token count 1..=4 calling `$f::<BITS, T>` for the matrix's bit width.
macro_rules! dispatch_tokens {
    ($f:ident, $bits:expr, $n:expr, ($($arg:expr),*)) => {
        match ($bits, $n) {
            (8, 1) => $f::<8, 1>($($arg),*),
            (8, 2) => $f::<8, 2>($($arg),*),
            (8, 3) => $f::<8, 3>($($arg),*),
            (8, 4) => $f::<8, 4>($($arg),*),
            (4, 1) => $f::<4, 1>($($arg),*),
            (4, 2) => $f::<4, 2>($($arg),*),
            (4, 3) => $f::<4, 3>($($arg),*),
            (4, 4) => $f::<4, 4>($($arg),*),
            _ => unreachable!("bits and token count are checked by the caller"),
        }
    };
}
pub(crate) use dispatch_tokens;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize_rows, MatLayout, QuantActs, GROUP_SIZES};
    use crate::testutil::{rel_err, Rng};

    fn make(
        rng: &mut Rng,
        n: usize,
        k: usize,
        bits: u32,
        g: usize,
    ) -> (MatLayout, Vec<u8>, Vec<f32>) {
        let l = MatLayout::new(n, k, bits, g).unwrap();
        let w = rng.normal_vec(n * k);
        let mut q = vec![0u8; l.weights_nbytes()];
        let mut s = vec![0f32; l.scales_len()];
        quantize_rows(&l, &w, 0..n, &mut q, &mut s);
        (l, q, s)
    }

    #[test]
    fn every_path_matches_f64_reference() {
        let mut rng = Rng::new(11);
        let (n, k) = (64, 384);
        for bits in [4u32, 8] {
            for g in GROUP_SIZES {
                let (l, q, s) = make(&mut rng, n, k, bits, g);
                let m = MatRef::new(l, &q, &s).unwrap();
                let deq = dequantize(&m);
                for tokens in 1..=MAX_TOKENS {
                    let x: Vec<f32> = rng.normal_vec(tokens * k);
                    let acts = QuantActs::from_rows(&x, k, g);
                    let mut reference = vec![0f64; tokens * n];
                    for t in 0..tokens {
                        for r in 0..n {
                            reference[t * n + r] = (0..k)
                                .map(|i| deq[r * k + i] as f64 * x[t * k + i] as f64)
                                .sum();
                        }
                    }
                    let xs: Vec<&[f32]> = (0..tokens).map(|t| &x[t * k..(t + 1) * k]).collect();
                    let ar: Vec<ActRef> = (0..tokens).map(|t| acts.token(t)).collect();
                    let mut scalar_int = vec![0f32; tokens * n];
                    for path in SimdPath::all_supported() {
                        let mut yi = vec![0f32; tokens * n];
                        let mut yf = vec![0f32; tokens * n];
                        let mut o = vec![0f32; n * tokens];
                        row_dot_int(path, &m, 0..n, &ar, &mut o);
                        for r in 0..n {
                            for t in 0..tokens {
                                yi[t * n + r] = o[r * tokens + t];
                            }
                        }
                        // An odd sub-range, to check the row offsets.
                        row_dot_f32(path, &m, 0..3, &xs, &mut o);
                        row_dot_f32(path, &m, 3..n, &xs, &mut o[3 * tokens..]);
                        for r in 0..n {
                            for t in 0..tokens {
                                yf[t * n + r] = o[r * tokens + t];
                            }
                        }
                        let ei = rel_err(&yi, &reference);
                        let ef = rel_err(&yf, &reference);
                        assert!(
                            ei < 1e-2,
                            "{path:?} bits {bits} g {g} T {tokens}: int8-act err {ei}"
                        );
                        assert!(
                            ef < 1e-4,
                            "{path:?} bits {bits} g {g} T {tokens}: f32-act err {ef}"
                        );
                        if path == SimdPath::Scalar {
                            scalar_int = yi.clone();
                        }
                    }
                    // Integer paths do exact integer sums per group, so they agree with scalar
                    // to float rounding.
                    for path in SimdPath::all_supported() {
                        let mut yi = vec![0f32; tokens * n];
                        let mut o = vec![0f32; n * tokens];
                        row_dot_int(path, &m, 0..n, &ar, &mut o);
                        for r in 0..n {
                            for t in 0..tokens {
                                yi[t * n + r] = o[r * tokens + t];
                            }
                        }
                        let refd: Vec<f64> = scalar_int.iter().map(|v| *v as f64).collect();
                        assert!(rel_err(&yi, &refd) < 1e-5, "{path:?} vs scalar");
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_stored_values_are_exact() {
        // Bytes 0 (q = -128 for INT8, -8 for INT4) and 255 can arrive through set_expert_quantized;
        // the SIMD paths must still match scalar (no i16 saturation in maddubs).
        let k = 256;
        for bits in [4u32, 8] {
            let l = MatLayout::new(2, k, bits, 64).unwrap();
            let q: Vec<u8> = (0..l.weights_nbytes())
                .map(|i| if i % 3 == 0 { 0 } else { 255 })
                .collect();
            let s = vec![0.01f32; l.scales_len()];
            let m = MatRef::new(l, &q, &s).unwrap();
            let x: Vec<f32> = (0..k)
                .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            let acts = QuantActs::from_rows(&x, k, 64);
            let mut want = [0f32; 4];
            scalar::row_dot_int(&m, 1..2, &[acts.token(0)], &mut want);
            for path in SimdPath::all_supported() {
                let mut o = [0f32; 4];
                row_dot_int(path, &m, 1..2, &[acts.token(0)], &mut o);
                assert!(
                    (o[0] - want[0]).abs() <= 1e-4 * want[0].abs().max(1.0),
                    "{path:?} {} {}",
                    o[0],
                    want[0]
                );
            }
        }
    }

    /// The INT8-activation GGUF kernels, every type and path, T = 1..4, K with an even and (for the
    /// 32-value types) an odd number of blocks: SIMD against the scalar reference to float
    /// rounding, and every path against the float64 reference of the dequantised weights.
    #[test]
    fn gguf_int8_every_type_every_path_matches_scalar_and_f64_reference() {
        use crate::ggml_quants::{dequantize, tests::random_blocks, GgufMatRef, ACT_GROUP};
        use crate::quant::QuantActs;
        let mut rng = Rng::new(23);
        let n = 19;
        for ty in crate::ggml_quants::SUPPORTED {
            let ks: &[usize] = if ty.block_size() == 32 {
                &[512, 96]
            } else {
                &[512]
            };
            for &k in ks {
                let data = random_blocks(&mut rng, ty, n * k / ty.block_size());
                let m = GgufMatRef::new(ty, n, k, &data).unwrap();
                let deq = dequantize(&m);
                for tokens in 1..=MAX_TOKENS {
                    let x = rng.normal_vec(tokens * k);
                    let acts = QuantActs::from_rows(&x, k, ACT_GROUP);
                    let ar: Vec<ActRef> = (0..tokens).map(|t| acts.token(t)).collect();
                    let want: Vec<f64> = (0..n * tokens)
                        .map(|i| {
                            let (r, t) = (i / tokens, i % tokens);
                            (0..k)
                                .map(|c| deq[r * k + c] as f64 * x[t * k + c] as f64)
                                .sum()
                        })
                        .collect();
                    let mut scalar = vec![0f32; n * tokens];
                    ggml_scalar::row_dot_int(&m, 0..n, &ar, &mut scalar);
                    let es = rel_err(&scalar, &want);
                    assert!(es < 1e-4, "scalar {} K {k} T {tokens}: err {es}", ty.name());
                    let sd: Vec<f64> = scalar.iter().map(|v| *v as f64).collect();
                    for path in SimdPath::all_supported() {
                        let mut o = vec![0f32; n * tokens];
                        gguf_row_dot_int(path, &m, 0..5, &ar, &mut o);
                        gguf_row_dot_int(path, &m, 5..n, &ar, &mut o[5 * tokens..]);
                        // The project's bound for INT8 activations is 1e-2; the two-term
                        // activations give ~3e-5..6e-5 here.
                        let e = rel_err(&o, &want);
                        assert!(e < 1e-3, "{path:?} {} K {k} T {tokens}: err {e}", ty.name());
                        let es = rel_err(&o, &sd);
                        assert!(
                            es < 1e-5,
                            "{path:?} {} K {k} T {tokens}: vs scalar {es}",
                            ty.name()
                        );
                    }
                }
            }
        }
    }

    /// Weight bytes at their extremes (0x00 / 0xFF / 0x80 patterns, so Q8_0 holds -128 and 127 and
    /// the K-quants their largest scales and quants) against full-scale activations: no i16
    /// saturation or i32 overflow on any path.
    #[test]
    fn gguf_int8_extreme_blocks_match_scalar() {
        use crate::ggml_quants::{GgufMatRef, ACT_GROUP, SUPPORTED};
        use crate::quant::QuantActs;
        let k = 512;
        for ty in SUPPORTED {
            for pat in [[0x00u8, 0xFF], [0x80, 0xFF], [0x80, 0x80], [0xFF, 0xFF]] {
                let bb = ty.block_bytes();
                let mut data: Vec<u8> = (0..2 * k / ty.block_size() * bb)
                    .map(|i| pat[(i / 3) % 2])
                    .collect();
                for b in 0..data.len() / bb {
                    for &f in ty.half_fields() {
                        data[b * bb + f..b * bb + f + 2].copy_from_slice(&0x2C00u16.to_le_bytes());
                    }
                }
                let m = GgufMatRef::new(ty, 2, k, &data).unwrap();
                let x: Vec<f32> = (0..k)
                    .map(|i| if (i / 5) % 2 == 0 { 1.0 } else { -1.0 })
                    .collect();
                let acts = QuantActs::from_rows(&x, k, ACT_GROUP);
                let mut want = [0f32; 2];
                ggml_scalar::row_dot_int(&m, 0..2, &[acts.token(0)], &mut want);
                let wd: Vec<f64> = want.iter().map(|v| *v as f64).collect();
                for path in SimdPath::all_supported() {
                    let mut o = [0f32; 2];
                    gguf_row_dot_int(path, &m, 0..2, &[acts.token(0)], &mut o);
                    let e = rel_err(&o, &wd);
                    assert!(
                        e < 1e-5,
                        "{path:?} {} {pat:?}: {o:?} vs {want:?}",
                        ty.name()
                    );
                }
            }
        }
    }

    #[test]
    fn gguf_every_type_every_path_matches_f64_reference() {
        use crate::ggml_quants::{dequantize, tests::random_blocks, GgufMatRef, SUPPORTED};
        let mut rng = Rng::new(21);
        let (n, k) = (19, 512);
        for ty in SUPPORTED {
            let data = random_blocks(&mut rng, ty, n * k / ty.block_size());
            let m = GgufMatRef::new(ty, n, k, &data).unwrap();
            let deq = dequantize(&m);
            for tokens in 1..=MAX_TOKENS {
                let x = rng.normal_vec(tokens * k);
                let xs: Vec<&[f32]> = (0..tokens).map(|t| &x[t * k..(t + 1) * k]).collect();
                let want: Vec<f64> = (0..n * tokens)
                    .map(|i| {
                        let (r, t) = (i / tokens, i % tokens);
                        (0..k)
                            .map(|c| deq[r * k + c] as f64 * x[t * k + c] as f64)
                            .sum()
                    })
                    .collect();
                let mut scalar = vec![0f32; n * tokens];
                ggml_scalar::row_dot_f32(&m, 0..n, &xs, &mut scalar);
                for path in SimdPath::all_supported() {
                    let mut o = vec![0f32; n * tokens];
                    // An odd split, to check the row offsets.
                    gguf_row_dot_f32(path, &m, 0..5, &xs, &mut o);
                    gguf_row_dot_f32(path, &m, 5..n, &xs, &mut o[5 * tokens..]);
                    let e = rel_err(&o, &want);
                    assert!(e < 1e-5, "{path:?} {} T {tokens}: err {e}", ty.name());
                    let sd: Vec<f64> = scalar.iter().map(|v| *v as f64).collect();
                    assert!(rel_err(&o, &sd) < 1e-5, "{path:?} {} vs scalar", ty.name());
                }
            }
        }
    }
}
