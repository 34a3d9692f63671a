//! NUMA placement: which node holds each expert, binding memory to nodes (mbind), and the plans
//! that give each worker the rows of the experts on its own node. On a one-node machine every
//! plan degenerates to an even split over all workers.

use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumaPolicy {
    /// Each expert lives on one node (expert % nodes) and runs on that node's workers.
    Auto,
    /// Pages interleaved over all nodes; every worker helps with every expert.
    Interleave,
    /// No placement; every worker helps with every expert.
    Off,
}

impl NumaPolicy {
    pub fn parse(s: &str) -> Result<NumaPolicy, String> {
        match s {
            "auto" => Ok(NumaPolicy::Auto),
            "interleave" => Ok(NumaPolicy::Interleave),
            "off" => Ok(NumaPolicy::Off),
            o => Err(format!("numa must be \"auto\", \"interleave\" or \"off\", got {o:?}")),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            NumaPolicy::Auto => "auto",
            NumaPolicy::Interleave => "interleave",
            NumaPolicy::Off => "off",
        }
    }
}

const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;

/// Bind (or, with `interleave`, interleave) the pages of `[addr, addr + len)` to `nodes`.
/// `addr` must be page aligned; call before the pages are first touched.
pub fn mbind(addr: *mut u8, len: usize, nodes: &[usize], interleave: bool) -> Result<(), String> {
    let mut mask = [0 as libc::c_ulong; 16];
    let bits = 8 * std::mem::size_of::<libc::c_ulong>();
    for &n in nodes {
        if n >= mask.len() * bits {
            return Err(format!("NUMA node {n} beyond the supported {} nodes", mask.len() * bits));
        }
        mask[n / bits] |= 1 << (n % bits);
    }
    let mode = if interleave { MPOL_INTERLEAVE } else { MPOL_BIND };
    // SAFETY: mbind only changes the memory policy of the given range of this process's address
    // space; the mask array outlives the call and maxnode matches its size in bits.
    let rc = unsafe {
        libc::syscall(libc::SYS_mbind, addr as usize, len, mode, mask.as_ptr(), (mask.len() * bits) as libc::c_ulong, 0u32)
    };
    if rc != 0 {
        return Err(format!("mbind failed: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The node an expert is placed on.
pub fn expert_node(expert: usize, num_nodes: usize) -> usize {
    expert % num_nodes.max(1)
}

/// Workers of each node: `groups[n]` lists the worker ids on node n.
pub fn worker_groups(worker_nodes: &[usize], num_nodes: usize) -> Vec<Vec<usize>> {
    let mut g = vec![Vec::new(); num_nodes.max(1)];
    for (tid, &n) in worker_nodes.iter().enumerate() {
        g[n.min(num_nodes.max(1) - 1)].push(tid);
    }
    g
}

/// Rows of the slots (experts in use) that each worker computes: the slots of node n, each with
/// `rows` rows, laid end to end and split evenly over node n's workers. Slots of a node without
/// workers go to all workers. Returns, per worker, (slot, row range) segments.
pub fn plan_slot_rows(slot_nodes: &[usize], rows: usize, groups: &[Vec<usize>]) -> Vec<Vec<(usize, Range<usize>)>> {
    let nworkers: usize = groups.iter().map(|g| g.len()).sum();
    let mut plan = vec![Vec::new(); nworkers];
    let all: Vec<usize> = (0..nworkers).collect();
    let mut orphans = Vec::new();
    let mut by_node: Vec<Vec<usize>> = vec![Vec::new(); groups.len()];
    for (slot, &n) in slot_nodes.iter().enumerate() {
        if n < groups.len() && !groups[n].is_empty() {
            by_node[n].push(slot);
        } else {
            orphans.push(slot);
        }
    }
    let mut assign = |slots: &[usize], workers: &[usize]| {
        let total = slots.len() * rows;
        for (wi, &w) in workers.iter().enumerate() {
            let r = crate::pool::split_range(total, workers.len(), wi);
            let mut v = r.start;
            while v < r.end {
                let (si, row) = (v / rows, v % rows);
                let end = (r.end - si * rows).min(rows);
                plan[w].push((slots[si], row..end));
                v = si * rows + end;
            }
        }
    };
    for (n, slots) in by_node.iter().enumerate() {
        if !slots.is_empty() {
            assign(slots, &groups[n]);
        }
    }
    if !orphans.is_empty() {
        assign(&orphans, &all);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coverage(plan: &[Vec<(usize, Range<usize>)>], slots: usize, rows: usize) -> Vec<usize> {
        let mut hits = vec![0usize; slots * rows];
        for segs in plan {
            for (s, r) in segs {
                for i in r.clone() {
                    hits[s * rows + i] += 1;
                }
            }
        }
        hits
    }

    #[test]
    fn one_node_splits_evenly_over_all_workers() {
        let groups = worker_groups(&[0, 0, 0, 0], 1);
        let plan = plan_slot_rows(&[0, 0, 0], 10, &groups);
        assert!(coverage(&plan, 3, 10).iter().all(|&h| h == 1));
        let lens: Vec<usize> = plan.iter().map(|s| s.iter().map(|(_, r)| r.len()).sum()).collect();
        assert!(lens.iter().all(|&l| l == 7 || l == 8), "{lens:?}");
    }

    #[test]
    fn two_nodes_keep_experts_on_their_node() {
        // Workers 0, 2 on node 0; 1, 3 on node 1. Slots alternate nodes.
        let groups = worker_groups(&[0, 1, 0, 1], 2);
        assert_eq!(groups, vec![vec![0, 2], vec![1, 3]]);
        let slot_nodes: Vec<usize> = (0..5).map(|e| expert_node(e, 2)).collect();
        let plan = plan_slot_rows(&slot_nodes, 8, &groups);
        assert!(coverage(&plan, 5, 8).iter().all(|&h| h == 1));
        for (w, segs) in plan.iter().enumerate() {
            for (s, _) in segs {
                assert_eq!(slot_nodes[*s], [0, 1, 0, 1][w], "worker {w} got slot {s} of another node");
            }
        }
    }

    #[test]
    fn slots_of_a_node_without_workers_go_to_everyone() {
        let groups = worker_groups(&[0, 0], 2); // node 1 has no workers
        let plan = plan_slot_rows(&[0, 1, 1], 4, &groups);
        assert!(coverage(&plan, 3, 4).iter().all(|&h| h == 1));
    }

    #[test]
    fn policy_names() {
        for p in ["auto", "interleave", "off"] {
            assert_eq!(NumaPolicy::parse(p).unwrap().name(), p);
        }
        assert!(NumaPolicy::parse("yes").is_err());
    }
}
