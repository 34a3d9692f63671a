//! The llama.cpp (GGML / GGUF) block formats Krasis reads as stored, and their scalar reference
//! dequantisation: the definition every GGUF kernel is tested against.
//!
//! A GGUF weight W [N, K] is N rows, each K / block_size blocks laid end to end; a block holds
//! `block_size` consecutive values of the row. Multi-byte fields are little endian; `d`, `m`,
//! `dmin` are IEEE half floats. Layouts (bytes, in order):
//!
//! ```text
//! Q4_0  32 values, 18 B: d, qs[16]            v[j] = d * (lo4(qs[j]) - 8), v[j+16] = d * (hi4(qs[j]) - 8)
//! Q4_1  32 values, 20 B: d, m, qs[16]         v = d * q + m (q as Q4_0 without the -8)
//! Q5_0  32 values, 22 B: d, qh u32, qs[16]    q = nibble (as Q4_0) | bit i of qh << 4; v = d * (q - 16)
//! Q5_1  32 values, 24 B: d, m, qh u32, qs[16] v = d * q + m
//! Q8_0  32 values, 34 B: d, qs[32] i8         v = d * qs[i]
//! Q2_K 256 values, 84 B: scales[16], qs[64], d, dmin
//!       value i = 128h + 32s + j (h < 2, s < 4, j < 32): q = (qs[32h + j] >> 2s) & 3;
//!       sub-block b = i / 16: v = d * (scales[b] & 15) * q - dmin * (scales[b] >> 4)
//! Q3_K 256 values, 110 B: hmask[32], qs[64], scales[12] (16 six-bit signed, -32), d
//!       low 2 bits as Q2_K; high bit of value i = 32b + j is bit b of hmask[j]; q = low - 4 * !high;
//!       scale of sub-block b (16 values): low 4 bits = lo4(scales[b]) for b < 8, hi4(scales[b - 8])
//!       after; high 2 bits = (scales[8 + b % 4] >> 2 (b / 4)) & 3; v = d * (scale - 32) * q
//! Q4_K 256 values, 144 B: d, dmin, scales[12] (8 six-bit scales and mins), qs[128]
//!       value i = 64c + 32s + j: q = (qs[32c + j] >> 4s) & 15; sub-block b = i / 32:
//!       v = d * sc[b] * q - dmin * mn[b]
//!       sc[b] = scales[b] & 63,  mn[b] = scales[b + 4] & 63                         (b < 4)
//!       sc[b] = (scales[b + 4] & 15) | (scales[b - 4] >> 6) << 4,
//!       mn[b] = (scales[b + 4] >> 4) | (scales[b] >> 6) << 4                          (b >= 4)
//! Q5_K 256 values, 176 B: d, dmin, scales[12], qh[32], qs[128]
//!       as Q4_K, q |= ((qh[j] >> b) & 1) << 4 for value i = 32b + j
//! Q6_K 256 values, 210 B: ql[128], qh[64], scales[16] i8, d
//!       low 4 bits of value i = 128h + 64s + j (j < 64): (ql[64h + j] >> 4s) & 15;
//!       high 2 bits of value i = 128h + 32s + j (j < 32): (qh[32h + j] >> 2s) & 3;
//!       v = d * scales[i / 16] * (q - 32)
//! ```

use crate::quant::f16_to_f32;

/// The largest block (values) of any supported type.
pub const MAX_BLOCK: usize = 256;

/// The GGML tensor types Krasis has kernels for, with their GGML type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

pub const SUPPORTED: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

impl GgmlType {
    /// The GGML type id (`ggml_type` / `gguf.GGMLQuantizationType`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    fn supported_names() -> String {
        SUPPORTED.map(|t| t.name()).join(", ")
    }

    /// From a GGML type id; an error naming the supported types otherwise.
    pub fn from_id(id: u32) -> Result<GgmlType, String> {
        SUPPORTED.into_iter().find(|t| t.id() == id).ok_or_else(|| {
            format!(
                "GGML tensor type id {id} has no Krasis kernel; supported: {}",
                GgmlType::supported_names()
            )
        })
    }

    /// From a name such as "Q4_K" (case-insensitive); an error naming the supported types otherwise.
    pub fn parse(name: &str) -> Result<GgmlType, String> {
        let n = name.trim().to_ascii_uppercase();
        SUPPORTED
            .into_iter()
            .find(|t| t.name() == n)
            .ok_or_else(|| {
                format!(
                    "GGML tensor type {name:?} has no Krasis kernel; supported: {}",
                    GgmlType::supported_names()
                )
            })
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Byte offsets of the f16 fields in a block (filled with finite values by tests).
    pub fn half_fields(self) -> &'static [usize] {
        match self {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q3K => &[108],
            GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q6K => &[208],
        }
    }

    /// Bytes of one row of K values; an error if K is not a whole number of blocks.
    pub fn row_bytes(self, k: usize) -> Result<usize, String> {
        if k == 0 || !k.is_multiple_of(self.block_size()) {
            return Err(format!(
                "{}: row length K={k} must be a positive multiple of the block size {}",
                self.name(),
                self.block_size()
            ));
        }
        Ok(k / self.block_size() * self.block_bytes())
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Six-bit scale and min of sub-block `b` (0..8) of a Q4_K / Q5_K block's 12 scale bytes.
#[inline(always)]
pub fn k_scale_min(s: &[u8], b: usize) -> (u8, u8) {
    if b < 4 {
        (s[b] & 63, s[b + 4] & 63)
    } else {
        (
            (s[b + 4] & 15) | ((s[b - 4] >> 6) << 4),
            (s[b + 4] >> 4) | ((s[b] >> 6) << 4),
        )
    }
}

/// All 8 six-bit scales and mins of a Q4_K / Q5_K block's 12 scale bytes at once, as bytes packed
/// in u32 words: [scales 0..4, scales 4..8, mins 0..4, mins 4..8] (same values as `k_scale_min`).
#[inline(always)]
pub fn k_scales_mins_packed(s: &[u8]) -> [u32; 4] {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (w(0), w(4), w(8));
    [
        a & 0x3F3F_3F3F,
        (c & 0x0F0F_0F0F) | ((a >> 2) & 0x3030_3030),
        b & 0x3F3F_3F3F,
        ((c >> 4) & 0x0F0F_0F0F) | ((b >> 2) & 0x3030_3030),
    ]
}

/// Dequantise one block `blk` (block_bytes long) into `out` (block_size values), through its
/// integer form (`int_block`): value i = a[i / 16] * q[i] + b[i / 16].
pub fn dequantize_block(ty: GgmlType, blk: &[u8], out: &mut [f32]) {
    let bs = ty.block_size();
    assert!(out.len() >= bs);
    let (mut q, mut a, mut b) = ([0i8; 256], [0f32; 16], [0f32; 16]);
    int_block(ty, blk, &mut q, &mut a, &mut b);
    for (i, o) in out[..bs].iter_mut().enumerate() {
        *o = a[i / 16] * q[i] as f32 + b[i / 16];
    }
}

/// Activation group size (values per f32 unit) the GGUF INT8-activation kernels take.
pub const ACT_GROUP: usize = 32;

impl GgmlType {
    /// Whether INT8 activations (`act_int8`) use integer dot products for this type; the others
    /// (Q2_K, Q3_K) always take f32 activations.
    pub fn has_int_kernel(self) -> bool {
        !matches!(self, GgmlType::Q2K | GgmlType::Q3K)
    }
}

/// One block in integer form: value i = a[i / 16] * q[i] + b[i / 16] (block_size values;
/// 32-value types fill a[0..2], b[0..2]). The definition the INT8-activation kernels compute with.
pub fn int_block(
    ty: GgmlType,
    blk: &[u8],
    q: &mut [i8; 256],
    a: &mut [f32; 16],
    b: &mut [f32; 16],
) {
    assert!(blk.len() >= ty.block_bytes());
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (d, m, qs) = if ty == GgmlType::Q4_0 {
                (half(blk, 0), -8.0 * half(blk, 0), &blk[2..18])
            } else {
                (half(blk, 0), half(blk, 2), &blk[4..20])
            };
            for j in 0..16 {
                q[j] = (qs[j] & 15) as i8;
                q[j + 16] = (qs[j] >> 4) as i8;
            }
            *a = [d; 16];
            *b = [m; 16];
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (d, m, hoff) = if ty == GgmlType::Q5_0 {
                (half(blk, 0), -16.0 * half(blk, 0), 2)
            } else {
                (half(blk, 0), half(blk, 2), 4)
            };
            let qh = u32::from_le_bytes(blk[hoff..hoff + 4].try_into().unwrap());
            let qs = &blk[hoff + 4..hoff + 20];
            for j in 0..16 {
                q[j] = ((qs[j] & 15) as u32 | ((qh >> j) & 1) << 4) as i8;
                q[j + 16] = ((qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i8;
            }
            *a = [d; 16];
            *b = [m; 16];
        }
        GgmlType::Q8_0 => {
            for j in 0..32 {
                q[j] = blk[2 + j] as i8;
            }
            *a = [half(blk, 0); 16];
            *b = [0.0; 16];
        }
        GgmlType::Q2K => {
            let (sc, qs) = (&blk[0..16], &blk[16..80]);
            let (d, dmin) = (half(blk, 80), half(blk, 82));
            for (i, v) in q.iter_mut().enumerate() {
                let (h, s, j) = (i / 128, (i / 32) % 4, i % 32);
                *v = ((qs[32 * h + j] >> (2 * s)) & 3) as i8;
            }
            for s in 0..16 {
                a[s] = d * (sc[s] & 15) as f32;
                b[s] = -dmin * (sc[s] >> 4) as f32;
            }
        }
        GgmlType::Q3K => {
            let (hm, qs, sc) = (&blk[0..32], &blk[32..96], &blk[96..108]);
            let d = half(blk, 108);
            for (s, v) in a.iter_mut().enumerate() {
                let lo = if s < 8 { sc[s] & 15 } else { sc[s - 8] >> 4 };
                let hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
                *v = d * ((lo | hi << 4) as i32 - 32) as f32;
            }
            for i in 0..256 {
                let (h, s, j) = (i / 128, (i / 32) % 4, i % 32);
                let low = ((qs[32 * h + j] >> (2 * s)) & 3) as i8;
                let high = ((hm[i % 32] >> (i / 32)) & 1) as i8;
                q[i] = low - 4 * (1 - high);
            }
            *b = [0.0; 16];
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin, sc) = (half(blk, 0), half(blk, 2), &blk[4..16]);
            let (qh, qs) = if ty == GgmlType::Q5K {
                (Some(&blk[16..48]), &blk[48..176])
            } else {
                (None, &blk[16..144])
            };
            for s in 0..8 {
                let (scale, mn) = k_scale_min(sc, s);
                a[2 * s..2 * s + 2].fill(d * scale as f32);
                b[2 * s..2 * s + 2].fill(-dmin * mn as f32);
                for j in 0..32 {
                    let mut v = (qs[32 * (s / 2) + j] >> (4 * (s % 2))) & 15;
                    if let Some(qh) = qh {
                        v |= ((qh[j] >> s) & 1) << 4;
                    }
                    q[32 * s + j] = v as i8;
                }
            }
        }
        GgmlType::Q6K => {
            let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
            let d = half(blk, 208);
            for (i, v) in q.iter_mut().enumerate() {
                let (h, r) = (i / 128, i % 128);
                let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
                let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
                *v = (lo | hi << 4) as i8 - 32;
            }
            for s in 0..16 {
                a[s] = d * (sc[s] as i8) as f32;
            }
            *b = [0.0; 16];
        }
    }
}

/// A borrowed GGUF weight W [N, K]: `data` is the N rows of blocks exactly as stored in the file.
#[derive(Clone, Copy)]
pub struct GgufMatRef<'a> {
    pub ty: GgmlType,
    pub n: usize,
    pub k: usize,
    pub data: &'a [u8],
}

impl<'a> GgufMatRef<'a> {
    pub fn new(ty: GgmlType, n: usize, k: usize, data: &'a [u8]) -> Result<Self, String> {
        let rb = ty.row_bytes(k)?;
        if n == 0 || data.len() != n * rb {
            return Err(format!(
                "{} [{n}, {k}] must be {} bytes, got {}",
                ty.name(),
                n * rb,
                data.len()
            ));
        }
        Ok(GgufMatRef { ty, n, k, data })
    }
    pub fn row_bytes(&self) -> usize {
        self.k / self.ty.block_size() * self.ty.block_bytes()
    }
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
    pub fn blocks_per_row(&self) -> usize {
        self.k / self.ty.block_size()
    }
}

/// The whole matrix as f32 [N, K].
pub fn dequantize(m: &GgufMatRef) -> Vec<f32> {
    let mut out = vec![0f32; m.n * m.k];
    let (bs, bb) = (m.ty.block_size(), m.ty.block_bytes());
    for r in 0..m.n {
        let row = m.row(r);
        for b in 0..m.blocks_per_row() {
            let o = r * m.k + b * bs;
            dequantize_block(m.ty, &row[b * bb..(b + 1) * bb], &mut out[o..o + bs]);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::Rng;

    /// `blocks` random valid blocks of `ty`: random bytes, with every f16 field a finite small value.
    pub(crate) fn random_blocks(rng: &mut Rng, ty: GgmlType, blocks: usize) -> Vec<u8> {
        let bb = ty.block_bytes();
        let mut v: Vec<u8> = (0..blocks * bb).map(|_| rng.next_u64() as u8).collect();
        for b in 0..blocks {
            for &f in ty.half_fields() {
                let x = half::f16::from_f32(rng.normal() * 0.02)
                    .to_bits()
                    .to_le_bytes();
                v[b * bb + f..b * bb + f + 2].copy_from_slice(&x);
            }
        }
        v
    }

    #[test]
    fn type_ids_and_names_round_trip() {
        for t in SUPPORTED {
            assert_eq!(GgmlType::from_id(t.id()).unwrap(), t);
            assert_eq!(GgmlType::parse(t.name()).unwrap(), t);
            let bpw = t.block_bytes() as f64 * 8.0 / t.block_size() as f64;
            assert!((2.5..8.6).contains(&bpw), "{} {bpw}", t.name());
        }
        let e = GgmlType::from_id(1).unwrap_err();
        assert!(e.contains("Q4_K") && e.contains("Q8_0"), "{e}");
        assert!(GgmlType::Q4K.row_bytes(1408).is_err());
    }

    #[test]
    fn packed_k_scales_match_k_scale_min() {
        let mut rng = Rng::new(9);
        for _ in 0..2000 {
            let s: Vec<u8> = (0..12).map(|_| rng.next_u64() as u8).collect();
            let p = k_scales_mins_packed(&s);
            for b in 0..8 {
                let (sc, mn) = k_scale_min(&s, b);
                assert_eq!((p[b / 4] >> (8 * (b % 4))) as u8, sc);
                assert_eq!((p[2 + b / 4] >> (8 * (b % 4))) as u8, mn);
            }
        }
    }

    #[test]
    fn q8_0_and_q4_0_by_hand() {
        // d = 0.5 (f16 0x3800), values -3, 0, 5, ...
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&0x3800u16.to_le_bytes());
        b[2] = (-3i8) as u8;
        b[4] = 5;
        let mut o = [0f32; 32];
        dequantize_block(GgmlType::Q8_0, &b, &mut o);
        assert_eq!((o[0], o[1], o[2]), (-1.5, 0.0, 2.5));
        let mut b = vec![0x88u8; 18];
        b[0..2].copy_from_slice(&0x3800u16.to_le_bytes());
        b[2] = 0xF0; // value 0 -> 0 - 8, value 16 -> 15 - 8
        dequantize_block(GgmlType::Q4_0, &b, &mut o);
        assert_eq!((o[0], o[16], o[1]), (-4.0, 3.5, 0.0));
    }
}
