//! Dense quantised matmul y[M, N] = x[M, K] @ W^T, rows of W split over the pool's workers.

use crate::kernels::{row_tiles, weight_row_dot, WeightRef, MAX_TOKENS, ROW_TILE};
use crate::pool::{split_range, Disjoint, Pool, WorkQueue};
use crate::quant::{quantize_act, quantize_rows, ActRef, ActSlices, MatLayout, MatRef, QuantActs};
use crate::simd::SimdPath;

/// Float weights in one of the accepted input dtypes, row-major [N, K].
#[derive(Clone, Copy)]
pub enum WeightSrc<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

impl WeightSrc<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightSrc::F32(s) => s.len(),
            WeightSrc::F16(s) | WeightSrc::Bf16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements [start, start + out.len()) as f32.
    fn read(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            WeightSrc::F32(s) => out.copy_from_slice(&s[start..start + n]),
            WeightSrc::F16(s) => out
                .iter_mut()
                .zip(&s[start..start + n])
                .for_each(|(o, b)| *o = crate::quant::f16_to_f32(*b)),
            WeightSrc::Bf16(s) => out
                .iter_mut()
                .zip(&s[start..start + n])
                .for_each(|(o, b)| *o = crate::quant::bf16_to_f32(*b)),
        }
    }
}

/// Quantise `src` [N, K] into `weights` / `scales` (the layout's sizes), rows split over workers.
pub fn quantize_parallel(
    pool: &Pool,
    layout: &MatLayout,
    src: WeightSrc,
    weights: &mut [u8],
    scales: &mut [f32],
) {
    let (n, k) = (layout.n, layout.k);
    assert_eq!(src.len(), n * k, "weights must hold N*K values");
    assert_eq!(weights.len(), layout.weights_nbytes());
    assert_eq!(scales.len(), layout.scales_len());
    let (rb, gpr) = (layout.row_bytes(), layout.groups_per_row());
    let wd = Disjoint::new(weights);
    let sd = Disjoint::new(scales);
    let nt = pool.num_threads();
    pool.run(&|tid| {
        let rows = split_range(n, nt, tid);
        if rows.is_empty() {
            return;
        }
        let mut buf = vec![0f32; k * 64.min(rows.len())];
        let mut r0 = rows.start;
        while r0 < rows.end {
            let r1 = (r0 + 64).min(rows.end);
            let f = &mut buf[..(r1 - r0) * k];
            src.read(r0 * k, f);
            // SAFETY: worker `tid` alone owns rows `rows` of the output (split_range is disjoint).
            let (w, s) = unsafe { (wd.range(r0 * rb..r1 * rb), sd.range(r0 * gpr..r1 * gpr)) };
            quantize_rows(layout, f, 0..r1 - r0, w, s);
            r0 = r1;
        }
    });
}

/// Quantise M tokens of activations (see `QuantActs`), tokens split over the workers unless tiny.
pub fn quantize_acts(pool: &Pool, x: &[f32], k: usize, group: usize) -> QuantActs {
    let mut acts = QuantActs::default();
    quantize_acts_into(pool, x, k, group, &mut acts);
    acts
}

/// `quantize_acts` into `acts`, reusing its buffers.
pub fn quantize_acts_into(pool: &Pool, x: &[f32], k: usize, group: usize, acts: &mut QuantActs) {
    let m = x.len() / k;
    acts.reshape(m, k, group);
    if m < 2 || m * k < 4096 {
        for t in 0..m {
            acts.set_token(t, &x[t * k..(t + 1) * k]);
        }
        return;
    }
    let gpr = k / group;
    let nt = pool.num_threads();
    let hi = Disjoint::new(&mut acts.hi);
    let lo = Disjoint::new(&mut acts.lo);
    let s = Disjoint::new(&mut acts.scales);
    let ss = Disjoint::new(&mut acts.scaled_sums);
    pool.run(&|tid| {
        for t in split_range(m, nt, tid) {
            // SAFETY: token t belongs to this worker only (split_range is disjoint).
            let out = unsafe {
                ActSlices {
                    hi: hi.range(t * k..(t + 1) * k),
                    lo: lo.range(t * k..(t + 1) * k),
                    scales: s.range(t * gpr..(t + 1) * gpr),
                    scaled_sums: ss.range(t * gpr..(t + 1) * gpr),
                }
            };
            quantize_act(&x[t * k..(t + 1) * k], group, out);
        }
    });
}

/// Rows per unit of work in `matmul`.
const CHUNK_ROWS: usize = 64;

/// y[M, N] = x[M, K] @ W^T.
pub fn matmul(pool: &Pool, path: SimdPath, w: &MatRef, x: &[f32], act_int8: bool) -> Vec<f32> {
    matmul_weight(pool, path, &WeightRef::Krasis(*w), x, act_int8)
}

/// y[M, N] = x[M, K] @ W^T for either kind of weight (`act_int8` as in `moe::moe_forward`).
pub fn matmul_weight(
    pool: &Pool,
    path: SimdPath,
    w: &WeightRef,
    x: &[f32],
    act_int8: bool,
) -> Vec<f32> {
    let (n, k) = w.shape();
    assert_eq!(x.len() % k, 0, "x must hold M*K values");
    let m = x.len() / k;
    let _pin = pool.pin_caller();
    let act_int8 = act_int8 && w.int_group().is_some();
    let acts = if act_int8 {
        Some(quantize_acts(
            pool,
            x,
            k,
            w.int_group().expect("checked above"),
        ))
    } else {
        None
    };
    let mut y = vec![0f32; m * n];
    let out = Disjoint::new(&mut y);
    // Rows in chunks from a queue: a worker the OS delays holds up only its current chunk.
    let queue = WorkQueue::new(n.div_ceil(CHUNK_ROWS));
    pool.run(&|_| {
        let mut o = [0f32; MAX_TOKENS * ROW_TILE];
        let starts: Vec<usize> = (0..m).step_by(MAX_TOKENS).collect();
        let act_blocks: Vec<Vec<ActRef>> = match &acts {
            Some(a) => starts
                .iter()
                .map(|&t0| (t0..(t0 + MAX_TOKENS).min(m)).map(|t| a.token(t)).collect())
                .collect(),
            None => Vec::new(),
        };
        let x_blocks: Vec<Vec<&[f32]>> = starts
            .iter()
            .map(|&t0| {
                (t0..(t0 + MAX_TOKENS).min(m))
                    .map(|t| &x[t * k..(t + 1) * k])
                    .collect()
            })
            .collect();
        while let Some(c) = queue.take() {
            let rows = c * CHUNK_ROWS..((c + 1) * CHUNK_ROWS).min(n);
            for tile in row_tiles(rows, ROW_TILE) {
                for (b, &t0) in starts.iter().enumerate() {
                    let tb = x_blocks[b].len();
                    let ar: &[ActRef] = if act_int8 { &act_blocks[b] } else { &[] };
                    weight_row_dot(path, w, tile.clone(), ar, &x_blocks[b], act_int8, &mut o);
                    for (i, r) in tile.clone().enumerate() {
                        for j in 0..tb {
                            // SAFETY: element (t, r) is written only by the worker that took row r's chunk.
                            unsafe { *out.at((t0 + j) * n + r) = o[i * tb + j] };
                        }
                    }
                }
            }
        }
    });
    y
}

/// A quantised matrix that owns its bytes.
pub struct QuantMatrix {
    pub layout: MatLayout,
    pub weights: Vec<u8>,
    pub scales: Vec<f32>,
}

impl QuantMatrix {
    pub fn from_parts(
        layout: MatLayout,
        weights: Vec<u8>,
        scales: Vec<f32>,
    ) -> Result<QuantMatrix, String> {
        MatRef::new(layout, &weights, &scales)?;
        Ok(QuantMatrix {
            layout,
            weights,
            scales,
        })
    }
    pub fn quantize(pool: &Pool, layout: MatLayout, src: WeightSrc) -> QuantMatrix {
        let mut weights = vec![0u8; layout.weights_nbytes()];
        let mut scales = vec![0f32; layout.scales_len()];
        quantize_parallel(pool, &layout, src, &mut weights, &mut scales);
        QuantMatrix {
            layout,
            weights,
            scales,
        }
    }
    pub fn as_ref(&self) -> MatRef<'_> {
        MatRef {
            layout: self.layout,
            weights: &self.weights,
            scales: &self.scales,
        }
    }
    pub fn nbytes(&self) -> usize {
        self.weights.len() + self.scales.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize;
    use crate::testutil::{rel_err, Rng};
    use crate::topology::Topology;

    #[test]
    fn matmul_matches_reference_on_every_path() {
        let pool = Pool::new(3, &Topology::detect(), false);
        let mut rng = Rng::new(0);
        for (bits, g, m) in [(4, 128, 1), (8, 64, 5), (4, 32, 9), (8, 128, 3)] {
            let (n, k) = (37, 256);
            let w = rng.normal_vec(n * k);
            let qm = QuantMatrix::quantize(
                &pool,
                MatLayout::new(n, k, bits, g).unwrap(),
                WeightSrc::F32(&w),
            );
            let deq = dequantize(&qm.as_ref());
            let x = rng.normal_vec(m * k);
            let want: Vec<f64> = (0..m * n)
                .map(|i| {
                    (0..k)
                        .map(|j| deq[(i % n) * k + j] as f64 * x[(i / n) * k + j] as f64)
                        .sum()
                })
                .collect();
            for path in SimdPath::all_supported() {
                assert!(rel_err(&matmul(&pool, path, &qm.as_ref(), &x, true), &want) < 1e-2);
                assert!(rel_err(&matmul(&pool, path, &qm.as_ref(), &x, false), &want) < 1e-4);
            }
        }
    }

    #[test]
    fn half_inputs_quantise_like_f32() {
        let pool = Pool::new(2, &Topology::detect(), false);
        let mut rng = Rng::new(3);
        let (n, k) = (4, 128);
        let w = rng.normal_vec(n * k);
        let bf: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let wb: Vec<f32> = bf.iter().map(|b| crate::quant::bf16_to_f32(*b)).collect();
        let l = MatLayout::new(n, k, 8, 64).unwrap();
        let a = QuantMatrix::quantize(&pool, l, WeightSrc::Bf16(&bf));
        let b = QuantMatrix::quantize(&pool, l, WeightSrc::F32(&wb));
        assert_eq!(a.weights, b.weights);
        assert_eq!(a.scales, b.scales);
        let hf: Vec<u16> = w
            .iter()
            .map(|v| half::f16::from_f32(*v).to_bits())
            .collect();
        let c = QuantMatrix::quantize(&pool, l, WeightSrc::F16(&hf));
        let wh: Vec<f32> = hf.iter().map(|b| crate::quant::f16_to_f32(*b)).collect();
        let d = QuantMatrix::quantize(&pool, l, WeightSrc::F32(&wh));
        assert_eq!(c.weights, d.weights);
    }
}
