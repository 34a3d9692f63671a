//! Kernel and pool micro-benchmarks (no Python): `cargo bench --bench kernels`.
//! Prints the pool's dispatch overhead and, per SIMD path, one thread's row-kernel throughput
//! on a matrix that fits in L2 (the compute ceiling) for INT4/INT8 weights, M = 1 and 4.

use _core::kernels::{row_dot_f32, row_dot_int};
use _core::matmul::{QuantMatrix, WeightSrc};
use _core::pool::Pool;
use _core::quant::{ActRef, MatLayout, QuantActs};
use _core::simd::SimdPath;
use _core::topology::Topology;
use std::time::Instant;

fn main() {
    let topo = Topology::detect();
    for n in [1usize, 2, topo.cores.len()] {
        let pool = Pool::new(n, &topo, true);
        let t = pool.dispatch_overhead(100_000);
        println!("pool dispatch overhead, {n:>2} threads: {:.3} us", t * 1e6);
    }
    let pool = Pool::new(topo.cores.len(), &topo, true);
    {
        let x: Vec<f32> = (0..8 * 1408)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 50.0)
            .collect();
        let iters = 2000;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(QuantActs::from_rows(std::hint::black_box(&x), 1408, 128));
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "activation quantisation: {:.2} ns per value",
            s / x.len() as f64 * 1e9
        );
    }
    let (n, k) = (128usize, 2048usize);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
        .collect();
    let x: Vec<f32> = (0..4 * k)
        .map(|i| ((i * 104729 % 997) as f32 - 498.0) / 498.0)
        .collect();
    for bits in [4u32, 8] {
        let qm = QuantMatrix::quantize(
            &pool,
            MatLayout::new(n, k, bits, 128).unwrap(),
            WeightSrc::F32(&w),
        );
        let m = qm.as_ref();
        let acts = QuantActs::from_rows(&x, k, 128);
        for path in SimdPath::all_supported() {
            for tokens in [1usize, 4] {
                let ar: Vec<ActRef> = (0..tokens).map(|t| acts.token(t)).collect();
                let xs: Vec<&[f32]> = (0..tokens).map(|t| &x[t * k..(t + 1) * k]).collect();
                let mut out = vec![0f32; n * tokens];
                for (mode, int) in [("int8", true), ("f32", false)] {
                    let iters = if path == SimdPath::Scalar { 20 } else { 2000 };
                    for _ in 0..iters / 4 {
                        row_dot_int(path, &m, 0..n, &ar, &mut out);
                    }
                    let t = Instant::now();
                    for _ in 0..iters {
                        if int {
                            row_dot_int(path, &m, 0..n, &ar, &mut out);
                        } else {
                            row_dot_f32(path, &m, 0..n, &xs, &mut out);
                        }
                    }
                    let s = t.elapsed().as_secs_f64() / iters as f64;
                    std::hint::black_box(&out);
                    println!(
                        "{:>6} INT{bits} act={mode:<4} M={tokens}: {:7.2} GB/s of weights per thread (hot cache)",
                        path.name(),
                        (m.weights.len() + m.scales.len() * 4) as f64 / s / 1e9
                    );
                }
            }
        }
    }
    let bw = _core::bandwidth::read_bandwidth(&pool, 1 << 30, 5);
    println!(
        "DRAM read bandwidth, {} threads: {:.1} GB/s",
        pool.num_threads(),
        bw / 1e9
    );
    // Cold-weight matmul over all threads, M = 1: the decode case. 8 matrices of 32768 x 2048
    // (256 MiB at INT4) cycled so every call reads from DRAM.
    let (n, k) = (32768usize, 2048usize);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
        .collect();
    let x: Vec<f32> = (0..k)
        .map(|i| ((i * 104729 % 997) as f32 - 498.0) / 498.0)
        .collect();
    for bits in [4u32, 8] {
        for g in [32usize, 128] {
            let mats: Vec<QuantMatrix> = (0..8)
                .map(|_| {
                    QuantMatrix::quantize(
                        &pool,
                        MatLayout::new(n, k, bits, g).unwrap(),
                        WeightSrc::F32(&w),
                    )
                })
                .collect();
            for path in SimdPath::all_supported()
                .into_iter()
                .filter(|p| *p != SimdPath::Scalar)
            {
                for int in [true, false] {
                    for m in &mats {
                        _core::matmul::matmul(&pool, path, &m.as_ref(), &x, int);
                    }
                    let t = Instant::now();
                    let reps = 4;
                    for _ in 0..reps {
                        for m in &mats {
                            std::hint::black_box(_core::matmul::matmul(
                                &pool,
                                path,
                                &m.as_ref(),
                                &x,
                                int,
                            ));
                        }
                    }
                    let s = t.elapsed().as_secs_f64() / (reps * mats.len()) as f64;
                    let gbs = mats[0].nbytes() as f64 / s / 1e9;
                    println!(
                        "{:>6} INT{bits} g{g:<3} act={:<4} M=1 cold matmul {}x{}: {:6.1} GB/s = {:5.1}% of DRAM",
                        path.name(),
                        if int { "int8" } else { "f32" },
                        n,
                        k,
                        gbs,
                        100.0 * gbs * 1e9 / bw
                    );
                }
            }
        }
    }
}
