//! Small helpers for the crate's own tests: a seeded random generator and the error measure.

/// xorshift64* with a Box-Muller normal; seeded from the clock when `seed` is 0.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let s = if seed == 0 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        } else {
            seed
        };
        Rng(s | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// float64 reference of one SwiGLU expert from its dequantised weights (gate and up [I, H], down
/// [H, I], row-major): down(silu(gate x) * up x) for x [H]; returns [H].
pub fn expert_f64(g: &[f32], u: &[f32], d: &[f32], x: &[f32], h: usize, i: usize) -> Vec<f64> {
    let hv: Vec<f64> = (0..i)
        .map(|r| {
            let gv: f64 = (0..h).map(|c| g[r * h + c] as f64 * x[c] as f64).sum();
            let uv: f64 = (0..h).map(|c| u[r * h + c] as f64 * x[c] as f64).sum();
            gv / (1.0 + (-gv).exp()) * uv
        })
        .collect();
    (0..h)
        .map(|r| (0..i).map(|c| d[r * i + c] as f64 * hv[c]).sum())
        .collect()
}

/// max |got - want| / max |want|.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    let den = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
    num / den
}
