//! GgufExpertStore: the routed experts of a model read in place from GGUF files (memory-mapped,
//! no copy, no re-quantisation). Each MoE layer has three 3-D tensors, `blk.N.ffn_gate_exps`
//! [E, I, H], `ffn_up_exps` [E, I, H] and `ffn_down_exps` [E, H, I] (outermost first), each E
//! experts of rows of blocks laid end to end, so expert e's matrix is one contiguous byte range.
//! Python finds the tensors (file, offset, type) with the `gguf` package; this module checks the
//! sizes against the files and runs the same fused expert forward as `ExpertStore`.

use crate::ggml_quants::{GgmlType, GgufMatRef};
use crate::kernels::WeightRef;
use crate::moe::{ExpertRef, RoutedExperts};
use crate::store::check_expert_index;
use memmap2::Mmap;
use std::path::PathBuf;

/// Where one [E, N, K] expert tensor lies: file index, byte offset of its data, its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgufTensor {
    pub file: usize,
    pub offset: usize,
    pub ty: GgmlType,
}

/// The bytes the tensors point into: mapped files, or owned buffers (tests).
enum Backing {
    Mapped(Vec<Mmap>),
    Owned(Vec<Vec<u8>>),
}

impl Backing {
    fn file(&self, i: usize) -> &[u8] {
        match self {
            Backing::Mapped(m) => &m[i],
            Backing::Owned(v) => &v[i],
        }
    }
    fn len(&self) -> usize {
        match self {
            Backing::Mapped(m) => m.len(),
            Backing::Owned(v) => v.len(),
        }
    }
}

pub struct GgufExpertStore {
    pub num_layers: usize,
    pub num_experts: usize,
    pub hidden: usize,
    pub inter: usize,
    /// Per MoE layer: gate, up, down.
    pub tensors: Vec<[GgufTensor; 3]>,
    backing: Backing,
}

const NAMES: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"];

impl GgufExpertStore {
    /// Map `paths` read-only and check every tensor fits its file.
    pub fn open(
        paths: &[PathBuf],
        tensors: Vec<[GgufTensor; 3]>,
        num_experts: usize,
        hidden: usize,
        inter: usize,
    ) -> Result<GgufExpertStore, String> {
        let mut maps = Vec::with_capacity(paths.len());
        for p in paths {
            let f =
                std::fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()))?;
            // SAFETY: the mapping is read-only; Krasis never writes GGUF files, and the user is
            // told (ADVANCED.md) not to modify a GGUF while a model that reads it is loaded.
            let m =
                unsafe { Mmap::map(&f) }.map_err(|e| format!("cannot map {}: {e}", p.display()))?;
            maps.push(m);
        }
        Self::build(Backing::Mapped(maps), tensors, num_experts, hidden, inter)
    }

    /// A store over owned buffers standing in for files (tests, tools).
    pub fn from_buffers(
        buffers: Vec<Vec<u8>>,
        tensors: Vec<[GgufTensor; 3]>,
        num_experts: usize,
        hidden: usize,
        inter: usize,
    ) -> Result<GgufExpertStore, String> {
        Self::build(Backing::Owned(buffers), tensors, num_experts, hidden, inter)
    }

    fn build(
        backing: Backing,
        tensors: Vec<[GgufTensor; 3]>,
        num_experts: usize,
        hidden: usize,
        inter: usize,
    ) -> Result<GgufExpertStore, String> {
        if tensors.is_empty() || num_experts == 0 || hidden == 0 || inter == 0 {
            return Err(
                "a GGUF expert store needs at least one layer, one expert and non-empty shapes"
                    .into(),
            );
        }
        for (l, ts) in tensors.iter().enumerate() {
            for (i, t) in ts.iter().enumerate() {
                let (n, k) = if i < 2 {
                    (inter, hidden)
                } else {
                    (hidden, inter)
                };
                let rb =
                    t.ty.row_bytes(k)
                        .map_err(|e| format!("MoE layer {l} {}: {e}", NAMES[i]))?;
                if t.file >= backing.len() {
                    return Err(format!(
                        "MoE layer {l} {}: file index {} but only {} files",
                        NAMES[i],
                        t.file,
                        backing.len()
                    ));
                }
                let need = num_experts * n * rb;
                let have = backing.file(t.file).len();
                if t.offset.checked_add(need).is_none_or(|end| end > have) {
                    return Err(format!(
                        "MoE layer {l} {}: {} [{num_experts}, {n}, {k}] needs {need} bytes at offset {} but the file has {have}",
                        NAMES[i],
                        t.ty.name(),
                        t.offset
                    ));
                }
            }
        }
        Ok(GgufExpertStore {
            num_layers: tensors.len(),
            num_experts,
            hidden,
            inter,
            tensors,
            backing,
        })
    }

    /// Views of one expert's matrices (reads the files in place).
    pub fn expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, String> {
        check_expert_index(layer, self.num_layers, expert, self.num_experts)?;
        let ts = &self.tensors[layer];
        let mat = |i: usize| {
            let t = ts[i];
            let (n, k) = if i < 2 {
                (self.inter, self.hidden)
            } else {
                (self.hidden, self.inter)
            };
            let nb = n * t.ty.row_bytes(k).expect("checked in build");
            let start = t.offset + expert * nb;
            let data = &self.backing.file(t.file)[start..start + nb];
            WeightRef::Gguf(GgufMatRef::new(t.ty, n, k, data).expect("checked in build"))
        };
        Ok(ExpertRef {
            gate: mat(0),
            up: mat(1),
            down: mat(2),
            node: 0,
        })
    }

    /// Bytes of one expert's three matrices as stored.
    pub fn expert_nbytes(&self, layer: usize) -> usize {
        self.tensors[layer]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (n, k) = if i < 2 {
                    (self.inter, self.hidden)
                } else {
                    (self.hidden, self.inter)
                };
                n * t.ty.row_bytes(k).expect("checked in build")
            })
            .sum()
    }
}

/// The blocks are read as stored. `act_int8` in the forward: activations quantised per token to INT8 in groups
/// of 32 and integer dot products for the types that have them (`GgmlType::has_int_kernel`); else f32
/// activations throughout.
impl RoutedExperts for GgufExpertStore {
    fn sizes(&self) -> (usize, usize, usize) {
        (self.hidden, self.inter, self.num_experts)
    }

    fn expert_ref(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, String> {
        self.expert(layer, expert)
    }

    /// Its experts are not placed by NUMA node.
    fn numa_placed(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml_quants::tests::random_blocks;
    use crate::pool::Pool;
    use crate::simd::SimdPath;
    use crate::testutil::{expert_f64, rel_err, Rng};
    use crate::topology::Topology;

    #[test]
    fn forward_matches_f64_reference_with_mixed_types() {
        let pool = Pool::new(2, &Topology::detect(), false);
        let mut rng = Rng::new(5);
        let (e, h, i) = (4, 256, 64);
        // Layer 0: Q4_K gate/up (K = H = 256), Q8_0 down (K = I = 64, not a multiple of 256),
        // the mix llama.cpp writes when I is not a multiple of 256. Layer 1: Q6_K / Q5_0.
        let kinds = [
            [GgmlType::Q4K, GgmlType::Q4K, GgmlType::Q8_0],
            [GgmlType::Q6K, GgmlType::Q5K, GgmlType::Q5_0],
        ];
        let mut file = vec![7u8; 13]; // an odd header, so offsets are unaligned
        let mut tensors = Vec::new();
        for ks in kinds {
            let mut ts = [GgufTensor {
                file: 0,
                offset: 0,
                ty: GgmlType::Q8_0,
            }; 3];
            for (j, ty) in ks.into_iter().enumerate() {
                let (n, k) = if j < 2 { (i, h) } else { (h, i) };
                ts[j] = GgufTensor {
                    file: 0,
                    offset: file.len(),
                    ty,
                };
                file.extend(random_blocks(&mut rng, ty, e * n * k / ty.block_size()));
            }
            tensors.push(ts);
        }
        let store = GgufExpertStore::from_buffers(vec![file], tensors, e, h, i).unwrap();
        let (m, topk) = (3, 2);
        let x = rng.normal_vec(m * h);
        let ids = [0usize, 3, 1, 2, 3, 0];
        let w = [0.6f32, 0.4, 0.5, 0.5, 0.9, 0.1];
        for layer in 0..2 {
            let mut want = vec![0f64; m * h];
            for t in 0..m {
                for j in 0..topk {
                    let ex = store.expert(layer, ids[t * topk + j]).unwrap();
                    let (g, u, d) = (
                        ex.gate.dequantize(),
                        ex.up.dequantize(),
                        ex.down.dequantize(),
                    );
                    let out = expert_f64(&g, &u, &d, &x[t * h..(t + 1) * h], h, i);
                    for (r, o) in out.iter().enumerate() {
                        want[t * h + r] += w[t * topk + j] as f64 * o;
                    }
                }
            }
            for path in SimdPath::all_supported() {
                let y = store
                    .forward(&pool, path, layer, &x, &ids, &w, false)
                    .unwrap();
                let err = rel_err(&y, &want);
                assert!(
                    err < 1e-4,
                    "layer {layer} {path:?} f32 activations: err {err}"
                );
                // INT8 activations (two terms, groups of 32): the project's bound is 1e-2; the
                // two-term activations keep it near 1e-5.
                let y = store
                    .forward(&pool, path, layer, &x, &ids, &w, true)
                    .unwrap();
                let err = rel_err(&y, &want);
                assert!(
                    err < 1e-3,
                    "layer {layer} {path:?} INT8 activations: err {err}"
                );
            }
        }
    }

    #[test]
    fn sizes_are_checked_against_the_file() {
        let ts = vec![
            [GgufTensor {
                file: 0,
                offset: 0,
                ty: GgmlType::Q8_0,
            }; 3],
        ];
        let e = GgufExpertStore::from_buffers(vec![vec![0u8; 100]], ts.clone(), 2, 64, 32)
            .err()
            .unwrap();
        assert!(e.contains("ffn_gate_exps") && e.contains("needs"), "{e}");
        let ts = vec![
            [GgufTensor {
                file: 0,
                offset: 0,
                ty: GgmlType::Q4K,
            }; 3],
        ];
        let e = GgufExpertStore::from_buffers(vec![vec![0u8; 1 << 20]], ts, 2, 256, 96)
            .err()
            .unwrap();
        assert!(e.contains("block size 256"), "{e}");
    }
}
