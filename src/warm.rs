//! Reading experts' weights into the CPU caches ahead of their use.
//!
//! In a decode step the CPU is idle while the GPU runs a layer's attention, and the next layer's routed
//! experts are only known at its end. The GPU predicts them beforehand (the next layer's router applied to
//! this layer's hidden state); `warm` reads the predicted experts' bytes meanwhile. Each worker reads the rows
//! it computes first in the forward (`moe::home_rows`, its `HomeQueue` share), so they are in its own L2
//! (2 MB a core on the GPU machine): read into another core's cache, a row comes no faster than from DRAM.
//! A wrong guess costs DRAM bandwidth that was idle anyway, and changes no result.

use crate::moe::{forward_nodes, home_rows, ExpertRef, CHUNK_ROWS, DOWN_CHUNK_ROWS};
use crate::pool::Pool;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes read between two checks of `stop`.
const STOP_EVERY: usize = 16 << 10;
/// One read per cache line.
const LINE: usize = 64;

/// One byte of every cache line of `bytes`, summed so the reads cannot be optimised away.
fn touch(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .step_by(LINE)
        .fold(0u64, |s, &b| s.wrapping_add(b as u64))
}

/// Read the weights of `experts` (the likeliest first: every gate and up share, then every down share) with
/// every worker of `pool`, each the rows it computes first in a forward, until done or `stop()` (checked every
/// STOP_EVERY bytes a worker reads) says the experts are needed now. Returns the bytes read: none where the
/// forward (`numa` as passed to it) splits its work between several nodes' queues, which hand rows to any of
/// a node's workers.
pub fn warm(
    pool: &Pool,
    experts: &[ExpertRef],
    numa: bool,
    stop: &(dyn Fn() -> bool + Sync),
) -> usize {
    if forward_nodes(pool, numa) > 1 {
        return 0;
    }
    let read = AtomicUsize::new(0);
    let n = pool.num_threads();
    pool.run(&|tid| {
        let gate_up = experts.iter().flat_map(|e| {
            let rows = home_rows(e.gate.shape().0, CHUNK_ROWS, n, tid);
            [e.gate.row_bytes(rows.clone()), e.up.row_bytes(rows)]
        });
        let down = experts.iter().map(|e| {
            e.down
                .row_bytes(home_rows(e.down.shape().0, DOWN_CHUNK_ROWS, n, tid))
        });
        let (mut sum, mut done) = (0u64, 0usize);
        'all: for bytes in gate_up.chain(down).flatten() {
            for piece in bytes.chunks(STOP_EVERY) {
                if stop() {
                    break 'all;
                }
                sum = sum.wrapping_add(touch(piece));
                done += piece.len();
            }
        }
        std::hint::black_box(sum);
        read.fetch_add(done, Ordering::Relaxed);
    });
    read.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::NumaPolicy;
    use crate::store::ExpertStore;
    use crate::topology::Topology;
    use std::sync::atomic::AtomicBool;

    fn store() -> ExpertStore {
        ExpertStore::new(2, 4, 128, 64, 4, 32, NumaPolicy::Off, 1).unwrap()
    }

    #[test]
    fn reads_every_byte_of_the_experts_once_when_not_stopped() {
        let (s, pool) = (store(), Pool::new(3, &Topology::detect(), false));
        let experts = [s.expert(1, 2).unwrap(), s.expert(1, 0).unwrap()];
        let matrices = |x: &ExpertRef| -> usize {
            [&x.gate, &x.up, &x.down]
                .iter()
                .flat_map(|w| w.row_bytes(0..w.shape().0))
                .map(|b| b.len())
                .sum()
        };
        let want = matrices(&experts[0]) + matrices(&experts[1]);
        assert!(
            want > s.layout.nbytes * 3 / 2,
            "weights and scales of both ({want} bytes)"
        );
        assert_eq!(warm(&pool, &experts, false, &|| false), want);
    }

    #[test]
    fn reads_nothing_once_stopped() {
        let (s, pool) = (store(), Pool::new(2, &Topology::detect(), false));
        let stopped = AtomicBool::new(true);
        let experts = [s.expert(0, 1).unwrap()];
        assert_eq!(
            warm(&pool, &experts, false, &|| stopped.load(Ordering::Relaxed)),
            0
        );
    }
}
