//! Run-time CPU feature detection and the choice of kernel path.
//!
//! The path is picked once per call from `active()`: a path forced with `force()` (Python:
//! `set_simd_path`), else the `KRASIS_SIMD` environment variable, else the best path the CPU has.

use std::sync::atomic::{AtomicU8, Ordering};

/// The SIMD paths the kernels come in, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdPath {
    /// AVX-512 F/BW/VL with VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx512,
    /// AVX2 with FMA (Haswell, Zen 1 and later).
    Avx2,
    /// Plain Rust; the reference every other path is tested against.
    Scalar,
}

impl SimdPath {
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Avx512 => "avx512",
            SimdPath::Avx2 => "avx2",
            SimdPath::Scalar => "scalar",
        }
    }

    pub fn parse(name: &str) -> Result<SimdPath, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "avx512" => Ok(SimdPath::Avx512),
            "avx2" => Ok(SimdPath::Avx2),
            "scalar" => Ok(SimdPath::Scalar),
            other => Err(format!(
                "unknown SIMD path {other:?}: use avx512, avx2 or scalar"
            )),
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            SimdPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this CPU supports, fastest first.
    pub fn all_supported() -> Vec<SimdPath> {
        [SimdPath::Avx512, SimdPath::Avx2, SimdPath::Scalar]
            .into_iter()
            .filter(|p| p.supported())
            .collect()
    }

    fn code(self) -> u8 {
        match self {
            SimdPath::Avx512 => 1,
            SimdPath::Avx2 => 2,
            SimdPath::Scalar => 3,
        }
    }

    fn from_code(c: u8) -> Option<SimdPath> {
        match c {
            1 => Some(SimdPath::Avx512),
            2 => Some(SimdPath::Avx2),
            3 => Some(SimdPath::Scalar),
            _ => None,
        }
    }
}

/// The best path this CPU supports.
pub fn detect() -> SimdPath {
    SimdPath::all_supported()[0]
}

/// 0 = not chosen yet; otherwise `SimdPath::code`.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The path from `KRASIS_SIMD` if set, else the best one; an error if the CPU lacks the forced path.
pub fn from_env() -> Result<SimdPath, String> {
    match std::env::var("KRASIS_SIMD") {
        Ok(v) if !v.trim().is_empty() => {
            let p = SimdPath::parse(&v).map_err(|e| format!("KRASIS_SIMD: {e}"))?;
            if !p.supported() {
                return Err(format!(
                    "KRASIS_SIMD={} but this CPU lacks it (best available: {}); unset KRASIS_SIMD",
                    p.name(),
                    detect().name()
                ));
            }
            Ok(p)
        }
        _ => Ok(detect()),
    }
}

/// The path the kernels use now.
pub fn active() -> Result<SimdPath, String> {
    if let Some(p) = SimdPath::from_code(ACTIVE.load(Ordering::Relaxed)) {
        return Ok(p);
    }
    let p = from_env()?;
    ACTIVE.store(p.code(), Ordering::Relaxed);
    Ok(p)
}

/// Force a path for all later calls (`None` goes back to `KRASIS_SIMD` / detection).
pub fn force(path: Option<SimdPath>) -> Result<(), String> {
    match path {
        Some(p) if !p.supported() => Err(format!(
            "this CPU cannot run the {} path (best available: {})",
            p.name(),
            detect().name()
        )),
        Some(p) => {
            ACTIVE.store(p.code(), Ordering::Relaxed);
            Ok(())
        }
        None => {
            ACTIVE.store(0, Ordering::Relaxed);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_always_supported_and_names_round_trip() {
        assert!(SimdPath::Scalar.supported());
        for p in [SimdPath::Avx512, SimdPath::Avx2, SimdPath::Scalar] {
            assert_eq!(SimdPath::parse(p.name()).unwrap(), p);
        }
        assert!(SimdPath::parse("sse9").is_err());
        assert_eq!(*SimdPath::all_supported().last().unwrap(), SimdPath::Scalar);
    }
}
