//! A fixed pool of worker threads, created once and pinned one per core, that all run the same
//! job (a closure of the worker id) and then wait for the next. The calling thread is worker 0
//! (it runs its share instead of idling, so n workers use exactly n cores; it is not pinned),
//! and n - 1 threads are spawned for workers 1..n. Idle workers spin for a short
//! while (`KRASIS_SPIN_US`, default 200 us) so back-to-back calls start in well under a
//! microsecond, then park on a condition variable so an idle runtime costs no CPU. A
//! `KeepAwake` guard keeps them spinning for a run of jobs with idle gaps between them.

use crate::topology::Topology;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Job = *const (dyn Fn(usize) + Sync + 'static);

struct Shared {
    epoch: AtomicU64,
    /// Written by `run` before it bumps `epoch`, read by workers after they see the new epoch.
    job: UnsafeCell<Option<Job>>,
    remaining: AtomicUsize,
    panicked: AtomicBool,
    sleeping: AtomicUsize,
    /// Live `KeepAwake` guards: while any is held, idle workers spin instead of parking.
    awake_holds: AtomicUsize,
    shutdown: AtomicBool,
    wake_lock: Mutex<()>,
    wake: Condvar,
    done_lock: Mutex<()>,
    done: Condvar,
    /// Whether `run`'s caller has stopped spinning and waits on `done`: only then does the last
    /// worker to finish notify it (a notify is a futex syscall even when no one waits).
    caller_waits: AtomicBool,
    spin: Duration,
}

// SAFETY: every field but `job` is Sync by itself. `job` is written only by `run` while it holds
// the dispatch lock and no worker is running a job (remaining == 0), and read by workers only
// after an Acquire load of `epoch` that follows the Release bump made after the write; the
// pointee is `Sync`, and `run` does not return (so the closure stays alive) until every worker
// has finished with it.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    dispatch: Mutex<()>,
    /// (cpu, numa node index) of each worker.
    placement: Vec<(usize, usize)>,
    num_nodes: usize,
    /// `serving_node` of each node index.
    serving: Vec<usize>,
    pinned: bool,
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes a bit inside it (cpu < CPU_SETSIZE is
    // checked); sched_setaffinity(0, ..) only affects the calling thread. Failure is harmless.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Holds the pool's workers awake (`Pool::keep_awake`).
pub struct KeepAwake<'a> {
    pool: &'a Pool,
}

impl Drop for KeepAwake<'_> {
    fn drop(&mut self) {
        self.pool.shared.awake_holds.fetch_sub(1, Ordering::Relaxed);
    }
}

/// While alive, keeps the calling thread on one CPU (the core no spawned worker uses), so the
/// caller's share of a job never time-slices with a spinning worker; restores the caller's own
/// affinity on drop so threads it creates later (torch, numpy) do not inherit a one-core mask.
pub struct CallerPin {
    saved: Option<libc::cpu_set_t>,
}

thread_local! {
    /// Whether a CallerPin is alive on this thread (nested pins are no-ops).
    static CALLER_PINNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl CallerPin {
    fn new(cpu: Option<usize>) -> CallerPin {
        let Some(cpu) = cpu.filter(|&c| c < libc::CPU_SETSIZE as usize) else {
            return CallerPin { saved: None };
        };
        if CALLER_PINNED.with(|p| p.get()) {
            return CallerPin { saved: None };
        }
        // SAFETY: zeroed cpu_set_t values are valid; the libc calls read/write only those sets and
        // affect only the calling thread.
        unsafe {
            let mut saved: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if libc::sched_getaffinity(0, size, &mut saved) != 0 {
                return CallerPin { saved: None };
            }
            if libc::CPU_COUNT(&saved) == 1 && libc::CPU_ISSET(cpu, &saved) {
                return CallerPin { saved: None }; // already there (nested or pinned by the user)
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                return CallerPin { saved: None };
            }
            CALLER_PINNED.with(|p| p.set(true));
            CallerPin { saved: Some(saved) }
        }
    }
}

impl Drop for CallerPin {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores the mask read in `new` for the calling thread only.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), saved) };
            CALLER_PINNED.with(|p| p.set(false));
        }
    }
}

fn worker(shared: Arc<Shared>, tid: usize, cpu: Option<usize>) {
    if let Some(c) = cpu {
        pin_to(c);
    }
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = shared.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256)
                && start.elapsed() > shared.spin
                && shared.awake_holds.load(Ordering::Relaxed) == 0
            {
                let mut g = shared.wake_lock.lock().unwrap();
                shared.sleeping.fetch_add(1, Ordering::SeqCst);
                // (A KeepAwake taken meanwhile wakes the parked workers back to spinning.)
                while shared.epoch.load(Ordering::SeqCst) == seen
                    && shared.awake_holds.load(Ordering::SeqCst) == 0
                {
                    g = shared.wake.wait(g).unwrap();
                }
                shared.sleeping.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            std::hint::spin_loop();
        }
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: see `unsafe impl Sync for Shared`: the job was published before the epoch we
        // just observed and stays alive until we decrement `remaining` below.
        let job = unsafe { (*shared.job.get()).expect("job published with the epoch") };
        // SAFETY: `job` points to a live closure (see above).
        let f = unsafe { &*job };
        if catch_unwind(AssertUnwindSafe(|| f(tid))).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        // SeqCst with the caller's `caller_waits` store and `remaining` load: either it sees this
        // decrement and does not wait, or this sees it waiting and wakes it.
        if shared.remaining.fetch_sub(1, Ordering::SeqCst) == 1
            && shared.caller_waits.load(Ordering::SeqCst)
        {
            let _g = shared.done_lock.lock().unwrap();
            shared.done.notify_one();
        }
    }
}

impl Pool {
    /// A pool of `n` workers pinned round-robin over the topology's cores (`pin` false: unpinned).
    pub fn new(n: usize, topo: &Topology, pin: bool) -> Pool {
        let spin_us = std::env::var("KRASIS_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200u64);
        Pool::with_spin(n, topo, pin, Duration::from_micros(spin_us))
    }

    /// As `new`, with idle workers spinning for `spin` before they park.
    fn with_spin(n: usize, topo: &Topology, pin: bool, spin: Duration) -> Pool {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            awake_holds: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
            done_lock: Mutex::new(()),
            done: Condvar::new(),
            caller_waits: AtomicBool::new(false),
            spin,
        });
        let placement: Vec<(usize, usize)> =
            (0..n).map(|i| topo.cores[i % topo.cores.len()]).collect();
        let handles = placement
            .iter()
            .enumerate()
            .skip(1)
            .map(|(tid, &(cpu, _))| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("krasis-worker-{tid}"))
                    .spawn(move || worker(s, tid, if pin { Some(cpu) } else { None }))
                    .expect("spawning a pool worker thread")
            })
            .collect();
        let used_nodes = placement.iter().map(|p| p.1).max().unwrap_or(0) + 1;
        let has_workers = |n: usize| placement.iter().any(|p| p.1 == n);
        let first = (0..used_nodes).find(|&n| has_workers(n)).unwrap_or(0);
        let serving = (0..used_nodes)
            .map(|n| if has_workers(n) { n } else { first })
            .collect();
        Pool {
            shared,
            handles,
            dispatch: Mutex::new(()),
            placement,
            num_nodes: used_nodes,
            serving,
            pinned: pin,
        }
    }

    pub fn num_threads(&self) -> usize {
        self.placement.len()
    }
    /// Number of NUMA nodes that have at least one worker.
    pub fn num_nodes(&self) -> usize {
        self.num_nodes
    }
    /// NUMA node index of worker `tid`.
    pub fn node_of(&self, tid: usize) -> usize {
        self.placement[tid].1
    }
    /// The node whose workers run work placed on `node` (below `num_nodes`): `node` itself if it
    /// has workers, else the first node that has some.
    pub fn serving_node(&self, node: usize) -> usize {
        self.serving[node]
    }
    pub fn placement(&self) -> &[(usize, usize)] {
        &self.placement
    }

    /// Keep the calling thread on worker 0's core until the guard drops. `run` does this by
    /// itself; holding one guard across several `run` calls (one operation) saves the syscalls.
    pub fn pin_caller(&self) -> CallerPin {
        CallerPin::new(if self.pinned {
            Some(self.placement[0].0)
        } else {
            None
        })
    }

    /// Keep idle workers spinning (never parked) until the guard drops, for a run of jobs with
    /// short idle gaps between them that the spin time may not cover: a decode step's CPU experts,
    /// one job per layer with the GPU's part of the layer in between. A parked worker costs the
    /// next job its wake-up, and its core's sleep state its warm caches.
    pub fn keep_awake(&self) -> KeepAwake<'_> {
        // SeqCst with the workers' `sleeping` increment and their check of `awake_holds`: either
        // this sees a parking worker and wakes it, or the worker sees the hold and does not park.
        self.shared.awake_holds.fetch_add(1, Ordering::SeqCst);
        let parked = self.shared.sleeping.load(Ordering::SeqCst);
        if parked > 0 {
            // Wake the parked ones now, so the first job does not wait for them.
            let _g = self.shared.wake_lock.lock().unwrap();
            self.shared.wake.notify_all();
        }
        KeepAwake { pool: self }
    }

    /// Run `f(tid)` on every worker and return when all have finished. Panics if a worker's call
    /// panicked. Must not be called from inside a job (it would wait for itself).
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let _d = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let _pin = CallerPin::new(if self.pinned {
            Some(self.placement[0].0)
        } else {
            None
        });
        let s = &*self.shared;
        // SAFETY: erasing the lifetime is sound because this function does not return until
        // `remaining` reaches 0, i.e. until every worker has finished calling `f`.
        let job: Job = unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f) };
        // SAFETY: we hold the dispatch lock and no job is running (remaining == 0), so no worker
        // reads `job` concurrently (see `unsafe impl Sync for Shared`).
        unsafe { *s.job.get() = Some(job) };
        s.panicked.store(false, Ordering::Relaxed);
        s.remaining.store(self.num_threads() - 1, Ordering::Relaxed);
        if self.num_threads() > 1 {
            s.epoch.fetch_add(1, Ordering::SeqCst);
            if s.sleeping.load(Ordering::SeqCst) > 0 {
                let _g = s.wake_lock.lock().unwrap();
                s.wake.notify_all();
            }
        }
        let own = catch_unwind(AssertUnwindSafe(|| f(0)));
        let start = Instant::now();
        let mut spins = 0u32;
        while s.remaining.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > s.spin {
                let mut g = s.done_lock.lock().unwrap();
                s.caller_waits.store(true, Ordering::SeqCst);
                while s.remaining.load(Ordering::SeqCst) != 0 {
                    g = s.done.wait(g).unwrap();
                }
                s.caller_waits.store(false, Ordering::Relaxed);
                break;
            }
            std::hint::spin_loop();
        }
        if let Err(e) = own {
            std::panic::resume_unwind(e);
        }
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a krasis pool worker panicked (see the message above)");
        }
    }

    /// Mean wall time of `run` with an empty job, in seconds, over `iters` back-to-back calls.
    pub fn dispatch_overhead(&self, iters: usize) -> f64 {
        let _pin = self.pin_caller();
        self.run(&|_| {});
        let t = Instant::now();
        for _ in 0..iters {
            self.run(&|_| {});
        }
        t.elapsed().as_secs_f64() / iters.max(1) as f64
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::Release);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _g = s.wake_lock.lock().unwrap();
            s.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The process-wide pool and the process id that created it: a child made by fork() has none of
/// the parent's worker threads, so it must build its own pool instead of waiting on dead ones.
static GLOBAL: Mutex<Option<(u32, Arc<Pool>)>> = Mutex::new(None);
static REQUESTED: AtomicUsize = AtomicUsize::new(0);

/// Threads a new pool gets: `set_num_threads`, else `KRASIS_THREADS`, else one per physical core.
pub fn default_threads(topo: &Topology) -> usize {
    let req = REQUESTED.load(Ordering::Relaxed);
    if req > 0 {
        return req;
    }
    if let Some(n) = std::env::var("KRASIS_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if n > 0 {
            return n;
        }
    }
    topo.cores.len()
}

/// The process-wide pool, created on first use.
pub fn global() -> Arc<Pool> {
    let mut g = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    match g.take() {
        Some((owner, p)) if owner == pid => {
            *g = Some((owner, p.clone()));
            return p;
        }
        // Inherited through fork(): its threads do not exist here, and joining them in Drop would
        // hang, so leak it.
        Some((_, p)) => std::mem::forget(p),
        None => {}
    }
    let topo = Topology::detect();
    let p = Arc::new(Pool::new(default_threads(&topo), &topo, true));
    *g = Some((pid, p.clone()));
    p
}

/// Use `n` workers from now on; the current pool (if any) is retired once its last user is done.
pub fn set_num_threads(n: usize) -> Result<(), String> {
    if n == 0 {
        return Err("number of threads must be at least 1".into());
    }
    REQUESTED.store(n, Ordering::Relaxed);
    let mut g = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    let same = matches!(g.as_ref(), Some((owner, p)) if *owner == std::process::id() && p.num_threads() == n);
    if !same {
        if let Some((owner, p)) = g.take() {
            if owner != std::process::id() {
                std::mem::forget(p); // inherited through fork(): see `global`
            }
        }
    }
    Ok(())
}

/// Hands out the indices 0..n, each once, to whichever worker asks next: work is taken in small
/// chunks, so a worker that the OS delays (or that started late) holds up only its current chunk.
pub struct WorkQueue {
    next: AtomicUsize,
    n: usize,
}

impl WorkQueue {
    pub fn new(n: usize) -> WorkQueue {
        WorkQueue {
            next: AtomicUsize::new(0),
            n,
        }
    }
    pub fn take(&self) -> Option<usize> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.n).then_some(i)
    }
}

/// A cursor alone on its cache line: workers advancing their own do not contend for one line.
#[repr(align(64))]
#[derive(Default)]
struct Cursor(AtomicUsize);

/// Hands out the items of `groups` groups of `per_group` items each (item `g * per_group + i`), each once:
/// worker t first takes its own share of every group (items `split_range(per_group, workers, t)`, group by
/// group), then helps the others with what is left of theirs. A worker's share is the same from call to call
/// whatever the groups hold, so what it read ahead for its share (`warm`) is in its own caches; taking the
/// others' leftovers keeps a worker the OS delays from holding up the rest.
pub struct HomeQueue {
    cursors: Vec<Cursor>,
    groups: usize,
    per_group: usize,
}

impl HomeQueue {
    pub fn new(workers: usize, groups: usize, per_group: usize) -> HomeQueue {
        HomeQueue {
            cursors: (0..workers.max(1)).map(|_| Cursor::default()).collect(),
            groups,
            per_group,
        }
    }

    /// The next item for worker `tid`: its own first, then the others'.
    pub fn take(&self, tid: usize) -> Option<usize> {
        let w = self.cursors.len();
        for u in (0..w).map(|i| (tid + i) % w) {
            let share = split_range(self.per_group, w, u);
            let len = self.groups * share.len();
            if len == 0 || self.cursors[u].0.load(Ordering::Relaxed) >= len {
                continue;
            }
            let k = self.cursors[u].0.fetch_add(1, Ordering::Relaxed);
            if k < len {
                return Some((k / share.len()) * self.per_group + share.start + k % share.len());
            }
        }
        None
    }
}

/// Split `0..total` into `parts` contiguous ranges whose lengths differ by at most one.
pub fn split_range(total: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    (total * i / parts)..(total * (i + 1) / parts)
}

/// A mutable slice shared by workers that each write a different part of it.
pub struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: Disjoint only hands out access through `unsafe` methods whose contract is that no two
// threads touch the same element; with that, sharing it is like sharing disjoint &mut [T] parts.
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}
unsafe impl<T: Send> Send for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(s: &'a mut [T]) -> Self {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: std::marker::PhantomData,
        }
    }
    /// # Safety
    /// No other thread may access any element of `r` while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, r: std::ops::Range<usize>) -> &mut [T] {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "Disjoint range out of bounds"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len())
    }
    /// # Safety
    /// No other thread may access element `i` concurrently.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn at(&self, i: usize) -> &mut T {
        assert!(i < self.len, "Disjoint index out of bounds");
        &mut *self.ptr.add(i)
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn a_home_queue_hands_out_every_item_once_own_share_first() {
        let q = HomeQueue::new(3, 2, 7); // groups of 7: shares 0..2, 2..4, 4..7
        let first: Vec<usize> = (0..2).map(|_| q.take(1).unwrap()).collect();
        assert_eq!(first, vec![2, 3], "worker 1's share of group 0");
        assert_eq!(q.take(1), Some(9), "then of group 1");
        let mut seen: Vec<usize> = first.into_iter().chain([9]).collect();
        while let Some(i) = q.take(0) {
            seen.push(i);
        }
        seen.sort();
        assert_eq!(seen, (0..14).collect::<Vec<_>>());
        assert_eq!(q.take(2), None);
    }

    #[test]
    fn every_worker_runs_each_job_once() {
        let topo = Topology::detect();
        let pool = Pool::new(3, &topo, false);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(&|tid| {
                hits[tid].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1000));
    }

    /// Waits up to a second for `parked` workers of `pool` to be parked.
    fn wait_parked(pool: &Pool, parked: usize) -> bool {
        let end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            if pool.shared.sleeping.load(Ordering::SeqCst) == parked {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn keep_awake_wakes_parked_workers_and_keeps_them_spinning_until_dropped() {
        let pool = Pool::with_spin(3, &Topology::detect(), false, Duration::ZERO);
        pool.run(&|_| {});
        assert!(
            wait_parked(&pool, 2),
            "idle workers park after their spin time"
        );
        let awake = pool.keep_awake();
        assert!(wait_parked(&pool, 0), "keep_awake wakes them");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            pool.shared.sleeping.load(Ordering::SeqCst),
            0,
            "and they stay awake"
        );
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 3);
        drop(awake);
        assert!(
            wait_parked(&pool, 2),
            "they park again once the guard is gone"
        );
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = Pool::with_spin(2, &Topology::detect(), false, Duration::ZERO);
        let n = AtomicUsize::new(0);
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(2));
            pool.run(&|_| {
                n.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(n.load(Ordering::Relaxed), 40);
    }

    #[test]
    fn a_caller_that_stops_spinning_is_woken() {
        // No spin time: the caller waits on the condition variable for the slow worker.
        let pool = Pool::with_spin(3, &Topology::detect(), false, Duration::ZERO);
        let n = AtomicUsize::new(0);
        for i in 0..50 {
            pool.run(&|tid| {
                if tid == 1 + i % 2 {
                    std::thread::sleep(Duration::from_micros(300));
                }
                n.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(n.load(Ordering::Relaxed), 150);
    }

    #[test]
    fn worker_panic_reaches_caller_and_pool_survives() {
        let pool = Pool::new(2, &Topology::detect(), false);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|tid| assert!(tid != 1, "boom"))
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn work_queue_hands_out_each_index_once() {
        let pool = Pool::new(3, &Topology::detect(), false);
        let q = WorkQueue::new(1000);
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        pool.run(&|_| {
            while let Some(i) = q.take() {
                hits[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn work_of_a_node_without_workers_goes_to_the_first_node_with_some() {
        let topo = Topology {
            cores: vec![(0, 1), (1, 2)],
            num_nodes: 3,
        };
        let pool = Pool::new(2, &topo, false);
        assert_eq!(pool.num_nodes(), 3);
        let serving: Vec<usize> = (0..3).map(|n| pool.serving_node(n)).collect();
        assert_eq!(serving, vec![1, 1, 2]);
    }

    #[test]
    fn split_range_covers_everything() {
        let v: Vec<_> = (0..3).map(|i| split_range(10, 3, i)).collect();
        assert_eq!(v, vec![0..3, 3..6, 6..10]);
    }
}
