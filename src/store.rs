//! ExpertStore: every routed expert of a model (layers x experts x {gate, up, down}) quantised in
//! large page-aligned anonymous mappings, one per layer, NUMA-placed per expert. Kernels read
//! straight from these buffers; Python gets each buffer's (address, length) to register with CUDA.
//!
//! Layout of one layer buffer: expert e at offset e * expert_nbytes; inside an expert, gate
//! [I, H] at 0, up [I, H] at gate.nbytes(), down [H, I] at 2 * gate.nbytes(), each a matrix block
//! as described in `quant.rs`; expert_nbytes is the sum rounded up to 4096 (a page).

use crate::kernels::WeightRef;
use crate::matmul::{quantize_parallel, WeightSrc};
use crate::moe::{ExpertRef, RoutedExperts, SKIP};
use crate::numa::{expert_node, mbind, NumaPolicy};
use crate::pool::Pool;
use crate::quant::{align_up, MatLayout, MatRef};
use memmap2::MmapMut;

pub const PAGE: usize = 4096;

/// Where gate, up and down lie inside one expert's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertLayout {
    pub hidden: usize,
    pub inter: usize,
    pub gate: MatLayout,
    pub up: MatLayout,
    pub down: MatLayout,
    pub gate_offset: usize,
    pub up_offset: usize,
    pub down_offset: usize,
    /// Bytes per expert including the padding to a page.
    pub nbytes: usize,
}

impl ExpertLayout {
    pub fn new(
        hidden: usize,
        inter: usize,
        bits: u32,
        group: usize,
    ) -> Result<ExpertLayout, String> {
        let gate = MatLayout::new(inter, hidden, bits, group)
            .map_err(|e| format!("gate/up [I, H]: {e}"))?;
        let down =
            MatLayout::new(hidden, inter, bits, group).map_err(|e| format!("down [H, I]: {e}"))?;
        let (gate_offset, up_offset, down_offset) = (0, gate.nbytes(), 2 * gate.nbytes());
        let nbytes = align_up(down_offset + down.nbytes(), PAGE);
        Ok(ExpertLayout {
            hidden,
            inter,
            gate,
            up: gate,
            down,
            gate_offset,
            up_offset,
            down_offset,
            nbytes,
        })
    }
    /// (layout, offset) of matrix 0 = gate, 1 = up, 2 = down.
    pub fn matrix(&self, i: usize) -> (MatLayout, usize) {
        match i {
            0 => (self.gate, self.gate_offset),
            1 => (self.up, self.up_offset),
            _ => (self.down, self.down_offset),
        }
    }
}

pub struct ExpertStore {
    pub layout: ExpertLayout,
    pub num_layers: usize,
    pub num_experts: usize,
    pub policy: NumaPolicy,
    /// NUMA nodes the experts are spread over (1 unless policy is Auto on a multi-node machine).
    pub num_nodes: usize,
    buffers: Vec<MmapMut>,
}

impl ExpertStore {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        num_layers: usize,
        num_experts: usize,
        hidden: usize,
        inter: usize,
        bits: u32,
        group: usize,
        policy: NumaPolicy,
        machine_nodes: usize,
    ) -> Result<ExpertStore, String> {
        if num_layers == 0 || num_experts == 0 {
            return Err("num_layers and num_experts must be at least 1".into());
        }
        let layout = ExpertLayout::new(hidden, inter, bits, group)?;
        let len = num_experts
            .checked_mul(layout.nbytes)
            .ok_or_else(|| "layer size overflows".to_string())?;
        let mut buffers = Vec::with_capacity(num_layers);
        let num_nodes = if policy == NumaPolicy::Auto {
            machine_nodes.max(1)
        } else {
            1
        };
        for _ in 0..num_layers {
            let mut map = MmapMut::map_anon(len)
                .map_err(|e| format!("cannot map {len} bytes for a layer: {e}"))?;
            // SAFETY: madvise only hints the kernel about this mapping, which we own; failure is harmless.
            unsafe {
                libc::madvise(
                    map.as_mut_ptr() as *mut libc::c_void,
                    len,
                    libc::MADV_HUGEPAGE,
                )
            };
            if machine_nodes > 1 {
                let all: Vec<usize> = (0..machine_nodes).collect();
                let r = match policy {
                    NumaPolicy::Auto => (0..num_experts).try_for_each(|e| {
                        // SAFETY: e * nbytes + nbytes <= len, so the pointer stays inside the mapping.
                        let p = unsafe { map.as_mut_ptr().add(e * layout.nbytes) };
                        mbind(p, layout.nbytes, &[expert_node(e, machine_nodes)], false)
                    }),
                    NumaPolicy::Interleave => mbind(map.as_mut_ptr(), len, &all, true),
                    NumaPolicy::Off => Ok(()),
                };
                if let Err(e) = r {
                    eprintln!("krasis: NUMA placement skipped ({e})");
                }
            }
            buffers.push(map);
        }
        Ok(ExpertStore {
            layout,
            num_layers,
            num_experts,
            policy,
            num_nodes,
            buffers,
        })
    }

    /// A store whose layer buffers are the given cache files (one per layer, each exactly
    /// `num_experts * expert_nbytes` bytes in this layout), memory-mapped: nothing is parsed or
    /// copied, pages come from the page cache as the kernels touch them.
    pub fn open_files(
        paths: &[std::path::PathBuf],
        num_experts: usize,
        hidden: usize,
        inter: usize,
        bits: u32,
        group: usize,
    ) -> Result<ExpertStore, String> {
        if paths.is_empty() || num_experts == 0 {
            return Err("need at least one layer file and one expert".into());
        }
        let layout = ExpertLayout::new(hidden, inter, bits, group)?;
        let len = num_experts
            .checked_mul(layout.nbytes)
            .ok_or_else(|| "layer size overflows".to_string())?;
        let mut buffers = Vec::with_capacity(paths.len());
        for path in paths {
            let file = std::fs::File::open(path)
                .map_err(|e| format!("cannot open cache file {}: {e}", path.display()))?;
            let size = file
                .metadata()
                .map_err(|e| format!("cannot stat cache file {}: {e}", path.display()))?
                .len();
            if size != len as u64 {
                return Err(format!(
                    "cache file {} has {size} bytes, expected {len} ({num_experts} experts x {} bytes): \
                     it is truncated or belongs to another configuration",
                    path.display(),
                    layout.nbytes
                ));
            }
            // SAFETY: the mapping is private (copy-on-write), so nothing written through it reaches
            // the file. Cache parts are finished files that Krasis only ever replaces by rename, never
            // modifies in place, so the bytes under the map do not change while it lives.
            // populate (MAP_POPULATE): every page is faulted in now, at load, rather than on first use;
            // measured on the GPU machine, the first decode steps otherwise ran the CPU experts at a
            // quarter of their speed while the pages came in.
            let map = unsafe {
                memmap2::MmapOptions::new()
                    .len(len)
                    .populate()
                    .map_copy(&file)
            }
            .map_err(|e| format!("cannot map cache file {}: {e}", path.display()))?;
            buffers.push(map);
        }
        Ok(ExpertStore {
            layout,
            num_layers: paths.len(),
            num_experts,
            policy: NumaPolicy::Off,
            num_nodes: 1,
            buffers,
        })
    }

    fn check(&self, layer: usize, expert: usize) -> Result<(), String> {
        check_expert_index(layer, self.num_layers, expert, self.num_experts)
    }

    pub fn expert_bytes(&self, layer: usize, expert: usize) -> Result<&[u8], String> {
        self.check(layer, expert)?;
        let n = self.layout.nbytes;
        Ok(&self.buffers[layer][expert * n..(expert + 1) * n])
    }

    pub fn expert_bytes_mut(&mut self, layer: usize, expert: usize) -> Result<&mut [u8], String> {
        self.check(layer, expert)?;
        let n = self.layout.nbytes;
        Ok(&mut self.buffers[layer][expert * n..(expert + 1) * n])
    }

    /// Whether the forward places work by the experts' NUMA nodes.
    fn numa(&self) -> bool {
        self.policy == NumaPolicy::Auto && self.num_nodes > 1
    }

    pub fn node_of(&self, expert: usize) -> usize {
        expert_node(expert, self.num_nodes)
    }

    /// Views of one expert's matrices (reads the store in place).
    pub fn expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, String> {
        let b = self.expert_bytes(layer, expert)?;
        let l = &self.layout;
        let mat = |i: usize| {
            let (ml, off) = l.matrix(i);
            MatRef::from_block(ml, &b[off..off + ml.nbytes()])
        };
        Ok(ExpertRef {
            gate: WeightRef::Krasis(mat(0)),
            up: WeightRef::Krasis(mat(1)),
            down: WeightRef::Krasis(mat(2)),
            node: self.node_of(expert),
        })
    }

    /// Quantise float gate [I, H], up [I, H], down [H, I] into the expert's place.
    pub fn set_expert(
        &mut self,
        pool: &Pool,
        layer: usize,
        expert: usize,
        mats: [WeightSrc; 3],
    ) -> Result<(), String> {
        let l = self.layout;
        for (i, src) in mats.iter().enumerate() {
            let (ml, _) = l.matrix(i);
            if src.len() != ml.n * ml.k {
                return Err(format!(
                    "{} must have {}x{} values, got {}",
                    ["gate", "up", "down"][i],
                    ml.n,
                    ml.k,
                    src.len()
                ));
            }
        }
        let b = self.expert_bytes_mut(layer, expert)?;
        for (i, src) in mats.into_iter().enumerate() {
            let (ml, off) = l.matrix(i);
            let block = &mut b[off..off + ml.nbytes()];
            let (w, rest) = block.split_at_mut(ml.weights_nbytes());
            let so = ml.scales_offset() - ml.weights_nbytes();
            let sb = &mut rest[so..so + ml.scales_len() * 4];
            // SAFETY: `sb` lies inside the block, is 4-byte aligned (the mapping is page aligned
            // and every offset is a multiple of 64), has room for scales_len() f32s, and any
            // bytes are valid f32s; it is borrowed mutably from `b` for this iteration only.
            let scales = unsafe {
                std::slice::from_raw_parts_mut(sb.as_mut_ptr() as *mut f32, ml.scales_len())
            };
            quantize_parallel(pool, &ml, src, w, scales);
        }
        Ok(())
    }

    /// Copy already-quantised (weights, scales) for gate, up, down into the expert's place.
    pub fn set_expert_quantized(
        &mut self,
        layer: usize,
        expert: usize,
        parts: [(&[u8], &[f32]); 3],
    ) -> Result<(), String> {
        let l = self.layout;
        for (i, (w, s)) in parts.iter().enumerate() {
            let (ml, _) = l.matrix(i);
            MatRef::new(ml, w, s).map_err(|e| format!("{}: {e}", ["gate", "up", "down"][i]))?;
        }
        let b = self.expert_bytes_mut(layer, expert)?;
        for (i, (w, s)) in parts.iter().enumerate() {
            let (ml, off) = l.matrix(i);
            b[off..off + w.len()].copy_from_slice(w);
            let so = off + ml.scales_offset();
            for (j, v) in s.iter().enumerate() {
                b[so + 4 * j..so + 4 * j + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(())
    }

    /// Copy one expert's bytes (as `expert_bytes` returns them) into place.
    pub fn set_expert_bytes(
        &mut self,
        layer: usize,
        expert: usize,
        bytes: &[u8],
    ) -> Result<(), String> {
        let n = self.layout.nbytes;
        if bytes.len() != n {
            return Err(format!(
                "expert bytes must be expert_nbytes={n} long, got {}",
                bytes.len()
            ));
        }
        self.expert_bytes_mut(layer, expert)?.copy_from_slice(bytes);
        Ok(())
    }

    /// (address, length) of each layer's buffer.
    pub fn buffers(&self) -> Vec<(usize, usize)> {
        self.buffers
            .iter()
            .map(|b| (b.as_ptr() as usize, b.len()))
            .collect()
    }
}

impl RoutedExperts for ExpertStore {
    fn sizes(&self) -> (usize, usize, usize) {
        (self.layout.hidden, self.layout.inter, self.num_experts)
    }

    fn expert_ref(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, String> {
        self.expert(layer, expert)
    }

    fn numa_placed(&self) -> bool {
        self.numa()
    }
}

/// The argument checks every expert store's `forward` makes: x [M, h] with M >= 1, ids and
/// weights [M, k], every id below `num_experts` or SKIP, the output as long as x.
pub fn check_forward_args(
    h: usize,
    num_experts: usize,
    x: &[f32],
    ids: &[usize],
    weights: &[f32],
    out: &[f32],
) -> Result<(), String> {
    if let Some(bad) = ids.iter().find(|&&e| e >= num_experts && e != SKIP) {
        return Err(format!(
            "expert id {bad} out of range (num_experts={num_experts})"
        ));
    }
    if x.is_empty() || !x.len().is_multiple_of(h) {
        return Err(format!("x must be [M, {h}] with M >= 1"));
    }
    let m = x.len() / h;
    if ids.len() != weights.len() || ids.is_empty() || !ids.len().is_multiple_of(m) {
        return Err(format!("expert_ids and weights must both be [M={m}, k]"));
    }
    if out.len() != x.len() {
        return Err(format!("the output must be [M={m}, {h}] like x"));
    }
    Ok(())
}

/// An error naming the index when `layer` or `expert` is out of range (shared by the expert stores).
pub(crate) fn check_expert_index(
    layer: usize,
    num_layers: usize,
    expert: usize,
    num_experts: usize,
) -> Result<(), String> {
    if layer >= num_layers {
        return Err(format!(
            "layer {layer} out of range (num_layers={num_layers})"
        ));
    }
    if expert >= num_experts {
        return Err(format!(
            "expert {expert} out of range (num_experts={num_experts})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::SimdPath;
    use crate::testutil::{expert_f64, rel_err, Rng};
    use crate::topology::Topology;

    /// float64 reference of the routed-expert forward from the dequantised weights.
    fn reference(
        store: &ExpertStore,
        layer: usize,
        x: &[f32],
        ids: &[usize],
        w: &[f32],
    ) -> Vec<f64> {
        let (h, i) = (store.layout.hidden, store.layout.inter);
        let m = x.len() / h;
        let k = ids.len() / m;
        let mut y = vec![0f64; m * h];
        for t in 0..m {
            for j in 0..k {
                let e = store.expert(layer, ids[t * k + j]).unwrap();
                let (g, u, d) = (e.gate.dequantize(), e.up.dequantize(), e.down.dequantize());
                let out = expert_f64(&g, &u, &d, &x[t * h..(t + 1) * h], h, i);
                for (r, o) in out.iter().enumerate() {
                    y[t * h + r] += w[t * k + j] as f64 * o;
                }
            }
        }
        y
    }

    fn filled(
        pool: &Pool,
        rng: &mut Rng,
        bits: u32,
        g: usize,
        policy: NumaPolicy,
        nodes: usize,
    ) -> ExpertStore {
        let (layers, experts, h, i) = (2, 6, 128, 256);
        let mut s = ExpertStore::new(layers, experts, h, i, bits, g, policy, nodes).unwrap();
        for l in 0..layers {
            for e in 0..experts {
                let gate: Vec<f32> = rng.normal_vec(i * h).iter().map(|v| v * 0.1).collect();
                let up = rng.normal_vec(i * h);
                let down = rng.normal_vec(h * i);
                s.set_expert(
                    pool,
                    l,
                    e,
                    [
                        WeightSrc::F32(&gate),
                        WeightSrc::F32(&up),
                        WeightSrc::F32(&down),
                    ],
                )
                .unwrap();
            }
        }
        s
    }

    #[test]
    fn forward_matches_reference_on_every_path() {
        let pool = Pool::new(3, &Topology::detect(), false);
        let mut rng = Rng::new(0);
        for (bits, g) in [(4, 128), (8, 64), (4, 32), (8, 32)] {
            let s = filled(&pool, &mut rng, bits, g, NumaPolicy::Auto, 1);
            for m in [1usize, 3, 9] {
                let k = 3;
                let x = rng.normal_vec(m * 128);
                let ids: Vec<usize> = (0..m * k).map(|_| rng.below(6)).collect();
                let w: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32).collect();
                let want = reference(&s, 1, &x, &ids, &w);
                for path in SimdPath::all_supported() {
                    let yi = s.forward(&pool, path, 1, &x, &ids, &w, true).unwrap();
                    let yf = s.forward(&pool, path, 1, &x, &ids, &w, false).unwrap();
                    let (ei, ef) = (rel_err(&yi, &want), rel_err(&yf, &want));
                    assert!(ei < 1e-2, "{path:?} bits {bits} g {g} m {m}: int8 err {ei}");
                    assert!(ef < 1e-4, "{path:?} bits {bits} g {g} m {m}: f32 err {ef}");
                }
            }
        }
    }

    #[test]
    fn numa_split_gives_the_same_answer() {
        // Pretend the pool's workers sit on two nodes: results must not change.
        let topo = Topology::from_cores(vec![(0, 0), (0, 1), (0, 0), (0, 1)]);
        let pool = Pool::new(4, &topo, false);
        assert_eq!(pool.num_nodes(), 2);
        let mut rng = Rng::new(5);
        let mut s = filled(&pool, &mut rng, 4, 64, NumaPolicy::Off, 1);
        let x = rng.normal_vec(2 * 128);
        let ids = vec![0, 1, 2, 5, 3, 1];
        let w = vec![0.5f32, 0.3, 0.2, 0.6, 0.3, 0.1];
        let path = SimdPath::Scalar;
        let flat = s.forward(&pool, path, 0, &x, &ids, &w, false).unwrap();
        s.policy = NumaPolicy::Auto;
        s.num_nodes = 2;
        let split = s.forward(&pool, path, 0, &x, &ids, &w, false).unwrap();
        let want: Vec<f64> = flat.iter().map(|v| *v as f64).collect();
        assert!(rel_err(&split, &want) < 1e-6);
    }

    #[test]
    fn skipped_pairs_add_nothing() {
        let pool = Pool::new(2, &Topology::detect(), false);
        let mut rng = Rng::new(11);
        let s = filled(&pool, &mut rng, 4, 64, NumaPolicy::Off, 1);
        let x = rng.normal_vec(2 * 128);
        let w = vec![0.5f32, 0.3, 0.2, 0.6, 0.3, 0.1];
        let path = SimdPath::Scalar;
        let with_skip = s
            .forward(&pool, path, 0, &x, &[0, SKIP, 2, SKIP, 3, 1], &w, false)
            .unwrap();
        let zero_w = vec![0.5f32, 0.0, 0.2, 0.0, 0.3, 0.1];
        let want = s
            .forward(&pool, path, 0, &x, &[0, 1, 2, 5, 3, 1], &zero_w, false)
            .unwrap();
        let want: Vec<f64> = want.iter().map(|v| *v as f64).collect();
        assert!(rel_err(&with_skip, &want) < 1e-6);
        let all_skipped = s.forward(&pool, path, 0, &x, &[SKIP; 6], &w, true).unwrap();
        assert!(all_skipped.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bytes_round_trip_and_errors() {
        let pool = Pool::new(2, &Topology::detect(), false);
        let mut rng = Rng::new(9);
        let mut s = filled(&pool, &mut rng, 8, 128, NumaPolicy::Off, 1);
        let b = s.expert_bytes(0, 2).unwrap().to_vec();
        s.set_expert_bytes(1, 4, &b).unwrap();
        assert_eq!(s.expert_bytes(1, 4).unwrap(), &b[..]);
        let e = s.expert(0, 2).unwrap();
        let parts = [
            (
                e.gate.krasis().unwrap().weights.to_vec(),
                e.gate.krasis().unwrap().scales.to_vec(),
            ),
            (
                e.up.krasis().unwrap().weights.to_vec(),
                e.up.krasis().unwrap().scales.to_vec(),
            ),
            (
                e.down.krasis().unwrap().weights.to_vec(),
                e.down.krasis().unwrap().scales.to_vec(),
            ),
        ];
        s.set_expert_quantized(
            1,
            5,
            [
                (&parts[0].0, &parts[0].1),
                (&parts[1].0, &parts[1].1),
                (&parts[2].0, &parts[2].1),
            ],
        )
        .unwrap();
        assert_eq!(s.expert_bytes(1, 5).unwrap(), &b[..]);
        assert!(s.expert_bytes(2, 0).is_err());
        assert!(s
            .forward(&pool, SimdPath::Scalar, 0, &[0.0; 128], &[6], &[1.0], true)
            .is_err());
        let bufs = s.buffers();
        assert_eq!(bufs.len(), 2);
        assert!(bufs
            .iter()
            .all(|(a, n)| a % PAGE == 0 && *n == 6 * s.layout.nbytes));
    }
}
