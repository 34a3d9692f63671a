//! The host's half of a decode step that the GPU runs as one CUDA graph.
//!
//! The graph cannot call back into the host, so the two sides meet in page-locked host memory that the
//! GPU reads and writes directly (mapped through unified addressing). For each MoE layer of the step the
//! GPU writes the layer's staged row (normed hidden state, routing weights, expert ids) and then raises
//! `flags[0]` to the next sequence number; the host, spinning on that flag, runs the experts that are not
//! resident in VRAM through the CPU kernels, writes their weighted sum to the output row and raises
//! `flags[1]` to the same number; the GPU, spinning on `flags[1]`, copies the sum in and goes on. Sequence
//! numbers only grow, so neither side needs to reset a flag, and a step that stops half way (a timeout)
//! leaves the two counters unequal, which the caller detects and repairs.
//!
//! With `claims`, the staged row carries one more value per routed pair: nonzero where the GPU computes
//! the pair itself, so the host skips it: `CLAIMED` (1.0) for an expert it prefetched into VRAM, counted
//! as claimed; any other nonzero value (2.0: streamed over PCIe this step) is skipped uncounted, the
//! caller telling those apart from the totals.
//!
//! With hints (`Mailbox::with_hints`), the GPU also writes, during a layer's handshake, the experts it predicts
//! the next MoE layer will send to the CPU, then the handshake's number in front of them: having answered a
//! layer, the host reads those experts ahead (`warm`) while the GPU runs the next layer's attention.
//!
//! With a prefetch (`Mailbox::with_prefetch`), the GPU writes with each layer's staged row the experts
//! it predicts the next MoE layer will route and that are not resident, then the handshake's number in
//! front of them (one row per parity of the next layer's index); having answered a layer, the host
//! queues their copies into VRAM (`prefetch`, `expert_copy`), which the GPU runs at the next layer
//! once the copies have landed, while the host skips them there (they are `CLAIMED` in its row).

use crate::moe::SKIP;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// Mapped host buffers shared with the GPU's step graph. Built from memory the caller keeps alive and
/// does not otherwise touch while a `serve` runs; every access goes through raw pointers (volatile reads,
/// plain writes, atomics for the flags) because the GPU changes the memory behind the compiler's back.
pub struct Mailbox {
    staged: *const f32,
    out: *mut f32,
    flags: *const AtomicI64,
    hidden: usize,
    k: usize,
    claims: bool,
    hints: *const i64,
    num_hints: usize,
    prefetch: *const i64,
    num_prefetch: usize,
}

/// The flag of a routed pair whose expert the GPU prefetched (module docs).
pub const CLAIMED: f32 = 1.0;

/// What one `serve` did: routed pairs computed on the CPU, pairs the GPU claimed (prefetched), seconds
/// in the CPU kernels, seconds spent waiting for the GPU to stage a layer (reading ahead included), experts
/// hinted for reading ahead (read in part or whole: reading stops when the next layer is staged), how many
/// of those the next layer sent to the CPU, the bytes read ahead, the experts whose copies to VRAM
/// it queued (prefetch) and the seconds queuing them took.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServeStats {
    pub prefetched: usize,
    pub prefetch_seconds: f64,
    pub cpu_pairs: usize,
    pub claimed_pairs: usize,
    pub cpu_seconds: f64,
    pub wait_seconds: f64,
    pub warmed: usize,
    pub warmed_used: usize,
    pub warmed_bytes: usize,
}

impl Mailbox {
    /// `staged` holds at least `hidden + 2k` f32 (x | routing weights | ids as f32), or `hidden + 3k`
    /// with `claims` (then | claimed flags), `out` at least `hidden` f32, `flags` two i64.
    ///
    /// # Safety
    /// The three pointers are valid, aligned, and stay valid and unaliased by Rust references for the
    /// lifetime of the Mailbox (the GPU may write them at any time); the lengths above hold.
    pub unsafe fn new(
        staged: *const f32,
        out: *mut f32,
        flags: *const i64,
        hidden: usize,
        k: usize,
        claims: bool,
    ) -> Mailbox {
        Mailbox {
            staged,
            out,
            flags: flags as *const AtomicI64,
            hidden,
            k,
            claims,
            hints: std::ptr::null(),
            num_hints: 0,
            prefetch: std::ptr::null(),
            num_prefetch: 0,
        }
    }

    /// Queue copies of the GPU's predictions: `prefetch` holds 2 x (1 + `count`) i64, a row per parity
    /// of the next MoE layer's index: [0] the handshake during which the rest (expert ids, -1: none)
    /// were written.
    ///
    /// # Safety
    /// As for `new`: `prefetch` is valid and aligned for 2 x (1 + `count`) i64 for the Mailbox's
    /// lifetime.
    pub unsafe fn with_prefetch(mut self, prefetch: *const i64, count: usize) -> Mailbox {
        self.prefetch = prefetch;
        self.num_prefetch = count;
        self
    }

    /// The experts predicted during handshake `seq` for the next layer (of `parity`), once the GPU has
    /// written them (it always does when the step prefetches); an error after `timeout`.
    fn predicted(&self, parity: usize, seq: i64, timeout: Duration) -> Result<Vec<i64>, String> {
        // SAFETY: `with_prefetch`'s contract: row `parity` starts with an aligned i64 mark.
        let row = unsafe { self.prefetch.add(parity * (1 + self.num_prefetch)) };
        // SAFETY: as above; the mark is read atomically.
        let mark = unsafe { &*(row as *const AtomicI64) };
        if !spin_until(|| mark.load(Ordering::Acquire) >= seq, timeout) {
            return Err(format!(
                "the GPU did not write its prefetch prediction of handshake {seq}"
            ));
        }
        // SAFETY: as above, num_prefetch more i64 follow; volatile because the GPU wrote them. The GPU
        // writes this row again only two layers on, after the host has answered the next one.
        let ids = (1..=self.num_prefetch)
            .map(|i| unsafe { row.add(i).read_volatile() })
            .collect();
        if mark.load(Ordering::Acquire) != seq {
            return Err(format!(
                "the prefetch prediction of handshake {seq} was overwritten before it was read"
            ));
        }
        Ok(ids)
    }

    /// Read ahead on the GPU's hints: `hints` holds 1 + `num_hints` i64, [0] the handshake during which the
    /// rest (expert ids of the next MoE layer, likeliest first, -1: none) were written.
    ///
    /// # Safety
    /// As for `new`: `hints` is valid and aligned for 1 + `num_hints` i64 for the Mailbox's lifetime.
    pub unsafe fn with_hints(mut self, hints: *const i64, num_hints: usize) -> Mailbox {
        self.hints = hints;
        self.num_hints = num_hints;
        self
    }

    /// The hinted experts written during handshake `seq`, if the GPU has written them by now.
    fn hints_after(&self, seq: i64) -> Option<Vec<i64>> {
        if self.hints.is_null() {
            return None;
        }
        // SAFETY: `with_hints`' contract; [0] is an aligned i64 the GPU writes, read atomically.
        let mark = unsafe { &*(self.hints as *const AtomicI64) };
        if mark.load(Ordering::Acquire) != seq {
            return None;
        }
        // SAFETY: as above, num_hints more i64 follow; volatile because the GPU wrote them.
        let ids = (1..=self.num_hints)
            .map(|i| unsafe { self.hints.add(i).read_volatile() })
            .collect();
        // Still this handshake's: the GPU did not move on to the next layer's hints meanwhile.
        (mark.load(Ordering::Acquire) == seq).then_some(ids)
    }

    fn flag(&self, i: usize) -> &AtomicI64 {
        // SAFETY: `new`'s contract: two aligned i64 that live as long as self; AtomicI64 has i64's layout.
        unsafe { &*self.flags.add(i) }
    }

    /// The last sequence number the host answered.
    pub fn answered(&self) -> i64 {
        self.flag(1).load(Ordering::Acquire)
    }

    /// The last sequence number the GPU staged.
    pub fn staged_seq(&self) -> i64 {
        self.flag(0).load(Ordering::Acquire)
    }

    /// Spin until the GPU has staged `seq`; an error after `timeout`.
    fn wait_staged(&self, seq: i64, timeout: Duration) -> Result<(), String> {
        if spin_until(|| self.flag(0).load(Ordering::Acquire) >= seq, timeout) {
            return Ok(());
        }
        Err(format!(
            "the GPU did not stage decode handshake {seq} within {:.0} s (last staged: {})",
            timeout.as_secs_f64(),
            self.staged_seq()
        ))
    }

    /// Copies of the staged row: (x [hidden], routing weights [k], ids [k] as f32, claimed [k]: all
    /// zero without `claims`).
    fn read_staged(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (h, k) = (self.hidden, self.k);
        // SAFETY: `new`'s contract gives hidden + 2k readable f32 (+ k with claims); volatile because
        // the GPU wrote them.
        let read = |at: usize, n: usize| -> Vec<f32> {
            (at..at + n)
                .map(|i| unsafe { self.staged.add(i).read_volatile() })
                .collect()
        };
        let claimed = if self.claims {
            read(h + 2 * k, k)
        } else {
            vec![0.0; k]
        };
        (read(0, h), read(h, k), read(h + k, k), claimed)
    }

    /// Write the layer's CPU sum and answer `seq`.
    fn answer(&self, y: &[f32], seq: i64) {
        debug_assert_eq!(y.len(), self.hidden);
        // SAFETY: `new`'s contract gives `hidden` writable f32 that no Rust reference aliases.
        unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), self.out, self.hidden) };
        // Release: the sum is visible before the flag that says it is there.
        self.flag(1).store(seq, Ordering::Release);
    }
}

/// Spin until `done()`; false when `timeout` passed first.
fn spin_until(done: impl Fn() -> bool, timeout: Duration) -> bool {
    let start = Instant::now();
    let mut spins = 0u32;
    while !done() {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && start.elapsed() > timeout {
            return done();
        }
    }
    true
}

/// Read the GPU's prediction for MoE layer `next` (of `parity`) written during handshake `seq` and hand
/// it to `prefetch` (which checks the ids against the layer's experts); returns the experts it queued.
fn queue_prefetch<P>(
    mb: &Mailbox,
    next: usize,
    parity: usize,
    seq: i64,
    timeout: Duration,
    prefetch: &mut P,
) -> Result<usize, String>
where
    P: FnMut(usize, usize, &[Option<usize>], i64) -> Result<usize, String>,
{
    let ids = mb
        .predicted(parity, seq, timeout)?
        .into_iter()
        .map(|id| match id {
            -1 => Ok(None),
            0.. => Ok(Some(id as usize)),
            _ => Err(format!(
                "the GPU predicted expert id {id} for MoE layer {next}"
            )),
        })
        .collect::<Result<Vec<_>, String>>()?;
    prefetch(next, parity, &ids, seq)
}

/// Answer the GPU's handshakes for one decode step: `layers[j]` is the MoE layer of the j-th. For each,
/// the staged experts neither resident in VRAM (`resident[layer * num_experts + id] < 0`) nor claimed
/// run through `forward(layer, x, ids, weights)` (ids SKIP elsewhere) and the rest count as the GPU's; every routed
/// id is recorded in `ids_out[j * k ..]`. A staged id out of range is an error (after the GPU has been
/// answered with zeros, so it is not left waiting). With hints, after answering layer j the hinted experts
/// of layer j + 1 that are not resident go to `warm(layer, ids, stop)`, whose `stop()` turns true once the GPU
/// has staged that layer, and which returns the bytes it read. With a prefetch, having answered layer j,
/// the predicted experts of layer j + 1 go to `prefetch(layer, parity, ids, seq)` (parity: (j + 1) % 2,
/// ids: one per prediction, None where the GPU predicted none; not yet checked against the layer's
/// experts), which queues their copies and returns how many it queued.
#[allow(clippy::too_many_arguments)]
pub fn serve<F, W, P>(
    mb: &Mailbox,
    layers: &[usize],
    resident: &[i64],
    num_experts: usize,
    ids_out: &mut [i64],
    timeout: Duration,
    mut forward: F,
    mut warm: W,
    mut prefetch: P,
) -> Result<ServeStats, String>
where
    F: FnMut(usize, &[f32], &[usize], &[f32]) -> Result<Vec<f32>, String>,
    W: FnMut(usize, &[usize], &(dyn Fn() -> bool + Sync)) -> usize,
    P: FnMut(usize, usize, &[Option<usize>], i64) -> Result<usize, String>,
{
    let (h, k) = (mb.hidden, mb.k);
    if ids_out.len() < layers.len() * k {
        return Err(format!(
            "ids_out holds {} ids, the step routes {} layers x {k}",
            ids_out.len(),
            layers.len()
        ));
    }
    let mut stats = ServeStats::default();
    let mut seq = mb.answered();
    let mut warmed: Vec<usize> = vec![];
    for (j, &layer) in layers.iter().enumerate() {
        seq += 1;
        let waited = Instant::now();
        mb.wait_staged(seq, timeout)?;
        stats.wait_seconds += waited.elapsed().as_secs_f64();
        let (x, w, ids_f, claimed) = mb.read_staged();
        let mut ids = vec![SKIP; k];
        let mut bad = None;
        for (i, &v) in ids_f.iter().enumerate() {
            let id = v as i64;
            ids_out[j * k + i] = id;
            if v != id as f32 || id < 0 || id as usize >= num_experts {
                bad = Some(v);
                continue;
            }
            if resident[layer * num_experts + id as usize] >= 0 {
                continue;
            }
            if claimed[i] != 0.0 {
                stats.claimed_pairs += (claimed[i] == CLAIMED) as usize;
            } else {
                ids[i] = id as usize;
                stats.cpu_pairs += 1;
                stats.warmed_used += warmed.contains(&(id as usize)) as usize;
            }
        }
        if let Some(v) = bad {
            mb.answer(&vec![0.0; h], seq);
            return Err(format!(
                "the GPU staged expert id {v} for MoE layer {layer} (valid: 0..{num_experts})"
            ));
        }
        let y = if ids.iter().any(|&e| e != SKIP) {
            let start = Instant::now();
            let y = forward(layer, &x, &ids, &w);
            stats.cpu_seconds += start.elapsed().as_secs_f64();
            match y {
                Ok(y) => y,
                Err(e) => {
                    mb.answer(&vec![0.0; h], seq);
                    return Err(e);
                }
            }
        } else {
            vec![0.0; h]
        };
        mb.answer(&y, seq);
        if let (Some(&next), true) = (layers.get(j + 1), mb.num_prefetch > 0) {
            // Queued once this layer is answered: the copies then run beside the next attention and the
            // host's experts of the next layer. (Queued when the layer is staged instead, they were still
            // crossing PCIe when the GPU read the host's answer, and decode was ~3% slower.)
            let start = Instant::now();
            stats.prefetched += queue_prefetch(mb, next, (j + 1) % 2, seq, timeout, &mut prefetch)?;
            stats.prefetch_seconds += start.elapsed().as_secs_f64();
        }
        warmed.clear();
        if let (Some(&next), Some(hints)) = (layers.get(j + 1), mb.hints_after(seq)) {
            warmed.extend(hints.iter().filter_map(|&id| {
                let ok = id >= 0
                    && (id as usize) < num_experts
                    && resident[next * num_experts + id as usize] < 0;
                ok.then_some(id as usize)
            }));
            if !warmed.is_empty() {
                let staged = mb.flag(0);
                let start = Instant::now();
                stats.warmed_bytes += warm(next, &warmed, &|| staged.load(Ordering::Acquire) > seq);
                stats.wait_seconds += start.elapsed().as_secs_f64();
                stats.warmed += warmed.len();
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn no_prefetch(_: usize, _: usize, _: &[Option<usize>], _: i64) -> Result<usize, String> {
        unreachable!("no prefetch")
    }

    /// A GPU stand-in on another thread: stages `rows` one after another, collecting the answers.
    struct Shared {
        staged: Vec<f32>,
        out: Vec<f32>,
        flags: [i64; 2],
    }

    /// A Mailbox over buffers the test owns and keeps alive while it is used.
    fn mailbox(
        staged: &[f32],
        out: &mut [f32],
        flags: &mut [i64],
        h: usize,
        k: usize,
        claims: bool,
    ) -> Mailbox {
        // SAFETY: the test keeps the buffers alive and does not touch them while `serve` runs.
        unsafe {
            Mailbox::new(
                staged.as_ptr(),
                out.as_mut_ptr(),
                flags.as_mut_ptr(),
                h,
                k,
                claims,
            )
        }
    }

    #[test]
    fn serves_each_staged_layer_in_order_and_skips_resident_experts() {
        let (h, k, e) = (4usize, 2usize, 3usize);
        let mut shared = Box::new(Shared {
            staged: vec![0.0; h + 2 * k],
            out: vec![0.0; h],
            flags: [0, 0],
        });
        let mb = mailbox(
            &shared.staged,
            &mut shared.out,
            &mut shared.flags,
            h,
            k,
            false,
        );
        // layer 0: expert 2 resident; layer 1: none
        let resident = vec![-1, -1, 0, -1, -1, -1];
        let addr = Arc::new((
            shared.staged.as_mut_ptr() as usize,
            shared.out.as_ptr() as usize,
            shared.flags.as_mut_ptr() as usize,
        ));
        let gpu = {
            let addr = Arc::clone(&addr);
            std::thread::spawn(move || {
                let (staged, out, flags) = *addr;
                let flags = flags as *const AtomicI64;
                let mut answers = vec![];
                for (seq, ids) in [(1i64, [1.0f32, 2.0]), (2, [2.0, 0.0])] {
                    // SAFETY: the test keeps `shared` alive until this thread is joined.
                    unsafe {
                        let s = staged as *mut f32;
                        for i in 0..h {
                            s.add(i).write_volatile(seq as f32 + i as f32);
                        }
                        s.add(h).write_volatile(0.5);
                        s.add(h + 1).write_volatile(0.25);
                        s.add(h + k).write_volatile(ids[0]);
                        s.add(h + k + 1).write_volatile(ids[1]);
                        (*flags).store(seq, Ordering::Release);
                        while (*flags.add(1)).load(Ordering::Acquire) < seq {
                            std::hint::spin_loop();
                        }
                        answers.push(
                            (0..h)
                                .map(|i| (out as *const f32).add(i).read_volatile())
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                answers
            })
        };
        let mut ids_out = vec![0i64; 2 * k];
        let mut calls = vec![];
        let stats = serve(
            &mb,
            &[0, 1],
            &resident,
            e,
            &mut ids_out,
            Duration::from_secs(10),
            |layer, x, ids, w| {
                calls.push((layer, ids.to_vec(), w.to_vec()));
                Ok(x.iter().map(|v| v * 2.0).collect())
            },
            |_, _, _| -> usize { unreachable!("no hints") },
            no_prefetch,
        )
        .unwrap();
        let answers = gpu.join().unwrap();
        assert_eq!(ids_out, vec![1, 2, 2, 0]);
        assert_eq!(calls[0], (0, vec![1, SKIP], vec![0.5, 0.25]));
        assert_eq!(calls[1], (1, vec![2, 0], vec![0.5, 0.25]));
        assert_eq!(stats.cpu_pairs, 3);
        assert_eq!(answers[0], vec![2.0, 4.0, 6.0, 8.0]);
        assert_eq!(answers[1], vec![4.0, 6.0, 8.0, 10.0]);
        assert_eq!(shared.flags, [2, 2]);
    }

    #[test]
    fn hinted_experts_of_the_next_layer_are_read_ahead_until_it_is_staged() {
        let (h, k, e) = (4usize, 2usize, 4usize);
        let mut shared = Box::new(Shared {
            staged: vec![0.0; h + 2 * k],
            out: vec![0.0; h],
            flags: [0, 0],
        });
        let mut hints = vec![0i64; 4];
        // SAFETY: `hints` outlives the mailbox and is only written by the stand-in thread meanwhile.
        let mb = unsafe {
            mailbox(
                &shared.staged,
                &mut shared.out,
                &mut shared.flags,
                h,
                k,
                false,
            )
            .with_hints(hints.as_ptr(), 3)
        };
        let resident = vec![-1, -1, -1, -1, 0, -1, -1, -1]; // layer 1: expert 0 resident
        let addr = (
            shared.staged.as_mut_ptr() as usize,
            shared.flags.as_mut_ptr() as usize,
            hints.as_mut_ptr() as usize,
        );
        let gpu = std::thread::spawn(move || {
            let (staged, flags, hints) = addr;
            let (s, flags, hints) = (
                staged as *mut f32,
                flags as *const AtomicI64,
                hints as *mut i64,
            );
            for seq in 1..=2i64 {
                // SAFETY: the test keeps the buffers alive until this thread is joined.
                unsafe {
                    s.add(h + k).write_volatile(1.0);
                    s.add(h + k + 1).write_volatile(3.0);
                    if seq == 1 {
                        // layer 1's likely experts, written during handshake 1: 2, 0 (resident), 3
                        // (before the staging flag here, so the host always finds them)
                        for (i, id) in [2i64, 0, 3].into_iter().enumerate() {
                            hints.add(1 + i).write_volatile(id);
                        }
                        (*(hints as *const AtomicI64)).store(1, Ordering::Release);
                    }
                    (*flags).store(seq, Ordering::Release);
                    while (*flags.add(1)).load(Ordering::Acquire) < seq {
                        std::hint::spin_loop();
                    }
                }
            }
        });
        let mut warmed = vec![];
        let stats = serve(
            &mb,
            &[0, 1],
            &resident,
            e,
            &mut [0; 4],
            Duration::from_secs(10),
            |_, x, _, _| Ok(x.to_vec()),
            |layer, ids, stop| {
                warmed.push((layer, ids.to_vec()));
                let start = Instant::now();
                while !stop() {
                    assert!(start.elapsed() < Duration::from_secs(10), "stop never came");
                }
                7
            },
            no_prefetch,
        )
        .unwrap();
        gpu.join().unwrap();
        assert_eq!(
            warmed,
            vec![(1, vec![2, 3])],
            "the next layer's hinted non-resident experts, once"
        );
        assert_eq!(
            (stats.warmed, stats.warmed_used),
            (2, 1),
            "layer 1 sent experts 1 and 3 to the CPU"
        );
        assert_eq!(stats.warmed_bytes, 7, "the bytes warm said it read");
    }

    #[test]
    fn predicted_experts_of_the_next_layer_are_handed_to_prefetch_after_each_answer() {
        let (h, k, e) = (4usize, 2usize, 4usize);
        let mut shared = Box::new(Shared {
            staged: vec![0.0; h + 3 * k],
            out: vec![0.0; h],
            flags: [0, 0],
        });
        let mut predicted = vec![0i64; 2 * 3]; // 2 parities x (mark + 2 ids)
                                               // SAFETY: `predicted` outlives the mailbox and is only written by the stand-in thread meanwhile.
        let mb = unsafe {
            mailbox(
                &shared.staged,
                &mut shared.out,
                &mut shared.flags,
                h,
                k,
                true,
            )
            .with_prefetch(predicted.as_ptr(), 2)
        };
        let addr = (
            shared.staged.as_mut_ptr() as usize,
            shared.flags.as_mut_ptr() as usize,
            predicted.as_mut_ptr() as usize,
        );
        let gpu = std::thread::spawn(move || {
            let (staged, flags, predicted) = addr;
            let (s, flags, p) = (
                staged as *mut f32,
                flags as *const AtomicI64,
                predicted as *mut i64,
            );
            // handshake 1 predicts layer 1's experts (parity 1), handshake 2 layer 2's (parity 0)
            let predictions = [[2i64, -1], [0, 3], [1, 1]];
            for seq in 1..=3i64 {
                // SAFETY: the test keeps the buffers alive until this thread is joined.
                unsafe {
                    s.add(h + k).write_volatile(1.0);
                    s.add(h + k + 1).write_volatile(3.0);
                    (*flags).store(seq, Ordering::Release);
                    // written a little after the hand-over (the step graph writes it before): the host waits
                    std::thread::sleep(Duration::from_millis(2));
                    let row = p.add(((seq as usize) % 2) * 3);
                    for (i, &id) in predictions[seq as usize - 1].iter().enumerate() {
                        row.add(1 + i).write_volatile(id);
                    }
                    (*(row as *const AtomicI64)).store(seq, Ordering::Release);
                    while (*flags.add(1)).load(Ordering::Acquire) < seq {
                        std::hint::spin_loop();
                    }
                }
            }
        });
        let mut queued = vec![];
        let stats = serve(
            &mb,
            &[0, 1, 2],
            &[-1; 12],
            e,
            &mut [0; 6],
            Duration::from_secs(10),
            |_, x, _, _| Ok(x.to_vec()),
            |_, _, _| -> usize { unreachable!("no hints") },
            |layer, parity, ids, seq| {
                queued.push((layer, parity, ids.to_vec(), seq));
                Ok(ids.iter().flatten().count())
            },
        )
        .unwrap();
        gpu.join().unwrap();
        assert_eq!(
            queued,
            vec![
                (1, 1, vec![Some(2), None], 1),
                (2, 0, vec![Some(0), Some(3)], 2)
            ],
            "each next layer's prediction once, none after the last layer"
        );
        assert_eq!(stats.prefetched, 3);
    }

    /// Serve one staged, flagged layer (ids 0..k, `flags` per pair) with `resident` (per expert): the ids the
    /// CPU forward was given, the stats, `ids_out` and the answered handshake.
    fn serve_flagged(
        flagged: &[f32],
        resident: &[i64],
    ) -> (Vec<Vec<usize>>, ServeStats, Vec<i64>, i64) {
        let (h, k) = (4usize, flagged.len());
        let mut staged = vec![1.0f32; h + 3 * k];
        for (i, v) in staged[h + k..h + 2 * k].iter_mut().enumerate() {
            *v = i as f32;
        }
        staged[h + 2 * k..].copy_from_slice(flagged);
        let (mut out, mut flags) = (vec![0.0f32; h], [1i64, 0]);
        let mb = mailbox(&staged, &mut out, &mut flags, h, k, true);
        let mut ids_out = vec![0i64; k];
        let mut seen = vec![];
        let stats = serve(
            &mb,
            &[0],
            resident,
            k,
            &mut ids_out,
            Duration::from_secs(1),
            |_, x, ids, _| {
                seen.push(ids.to_vec());
                Ok(x.to_vec())
            },
            |_, _, _| -> usize { unreachable!("no hints") },
            no_prefetch,
        )
        .unwrap();
        (seen, stats, ids_out, flags[1])
    }

    #[test]
    fn claimed_pairs_are_left_to_the_gpu_and_counted() {
        // ids 0, 1, 2; expert 2 resident, pair 0 claimed
        let (seen, stats, ids_out, answered) = serve_flagged(&[CLAIMED, 0.0, 0.0], &[-1, -1, 0]);
        assert_eq!(seen, vec![vec![SKIP, 1, SKIP]]);
        assert_eq!((stats.cpu_pairs, stats.claimed_pairs), (1, 1));
        assert_eq!(ids_out, vec![0, 1, 2]);
        assert_eq!(answered, 1);
    }

    #[test]
    fn streamed_pairs_are_left_to_the_gpu_uncounted() {
        // ids 0, 1, 2, 3, none resident: pair 1 streamed (2.0), pair 3 claimed
        let (seen, stats, _, _) = serve_flagged(&[0.0, 2.0, 0.0, CLAIMED], &[-1; 4]);
        assert_eq!(seen, vec![vec![0, SKIP, 2, SKIP]]);
        assert_eq!((stats.cpu_pairs, stats.claimed_pairs), (2, 1));
    }

    #[test]
    fn a_gpu_that_never_stages_times_out_with_a_message() {
        let (staged, mut out, mut flags) = (vec![0.0f32; 8], vec![0.0f32; 4], [0i64; 2]);
        let mb = mailbox(&staged, &mut out, &mut flags, 4, 2, false);
        let err = serve(
            &mb,
            &[0],
            &[-1, -1],
            2,
            &mut [0; 2],
            Duration::from_millis(50),
            |_, x, _, _| Ok(x.to_vec()),
            |_, _, _| -> usize { unreachable!("no hints") },
            no_prefetch,
        )
        .unwrap_err();
        assert!(err.contains("did not stage decode handshake 1"), "{err}");
    }

    #[test]
    fn an_out_of_range_id_is_answered_then_reported() {
        let (mut staged, mut out, mut flags) = (vec![0.0f32; 8], vec![1.0f32; 4], [1i64, 0]);
        staged[4 + 2] = 7.0; // ids start at hidden + k
        let mb = mailbox(&staged, &mut out, &mut flags, 4, 2, false);
        let err = serve(
            &mb,
            &[0],
            &[-1, -1],
            2,
            &mut [0; 2],
            Duration::from_secs(1),
            |_, x, _, _| Ok(x.to_vec()),
            |_, _, _| -> usize { unreachable!("no hints") },
            no_prefetch,
        )
        .unwrap_err();
        assert!(err.contains("expert id 7"), "{err}");
        assert_eq!(flags[1], 1);
        assert_eq!(out, vec![0.0; 4]);
    }
}
