//! DRAM read bandwidth measured with the pool's own pinned workers (each reads its own part of a
//! large buffer it first touched), so kernel figures can be compared with what the machine can do.

use crate::pool::{split_range, Disjoint, Pool};
use std::time::Instant;

fn sum_plain(s: &[u64]) -> u64 {
    s.iter().fold(0u64, |a, b| a.wrapping_add(*b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(s: &[u64]) -> u64 {
    s.iter().fold(0u64, |a, b| a.wrapping_add(*b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(s: &[u64]) -> u64 {
    s.iter().fold(0u64, |a, b| a.wrapping_add(*b))
}

fn sum(s: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { sum_avx512(s) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { sum_avx2(s) };
        }
    }
    sum_plain(s)
}

/// Best read rate in bytes/s over `repeats` passes over a buffer of `nbytes`.
pub fn read_bandwidth(pool: &Pool, nbytes: usize, repeats: usize) -> f64 {
    let words = (nbytes / 8).max(1024);
    let mut buf: Vec<u64> = Vec::with_capacity(words);
    let nt = pool.num_threads();
    {
        let spare = buf.spare_capacity_mut();
        let d = Disjoint::new(spare);
        pool.run(&|tid| {
            let r = split_range(words, nt, tid);
            let base = r.start as u64;
            // SAFETY: each worker initialises only its own range (split_range is disjoint); this is
            // also the first touch, so the pages land on the worker's NUMA node.
            for (i, w) in unsafe { d.range(r) }.iter_mut().enumerate() {
                w.write(base + i as u64);
            }
        });
    }
    // SAFETY: the workers above initialised all `words` elements.
    unsafe { buf.set_len(words) };
    let sums: Vec<std::sync::atomic::AtomicU64> = (0..nt).map(|_| 0.into()).collect();
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        pool.run(&|tid| {
            let s = sum(&buf[split_range(words, nt, tid)]);
            sums[tid].store(s, std::sync::atomic::Ordering::Relaxed);
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&sums);
    (words * 8) as f64 / best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Topology;

    #[test]
    fn bandwidth_is_positive() {
        let pool = Pool::new(2, &Topology::detect(), false);
        assert!(read_bandwidth(&pool, 1 << 22, 2) > 1e8);
    }
}
