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
            o => Err(format!(
                "numa must be \"auto\", \"interleave\" or \"off\", got {o:?}"
            )),
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
            return Err(format!(
                "NUMA node {n} beyond the supported {} nodes",
                mask.len() * bits
            ));
        }
        mask[n / bits] |= 1 << (n % bits);
    }
    let mode = if interleave {
        MPOL_INTERLEAVE
    } else {
        MPOL_BIND
    };
    // SAFETY: mbind only changes the memory policy of the given range of this process's address
    // space; the mask array outlives the call and maxnode matches its size in bits.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as usize,
            len,
            mode,
            mask.as_ptr(),
            (mask.len() * bits) as libc::c_ulong,
            0u32,
        )
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

/// The work of one phase as chunks per node: the rows of every slot (expert in use) on node n,
/// cut into pieces of at most `chunk` rows, go to `chunks[n]`; node n's workers take them from a
/// queue. Slots of a node without workers go to the first node that has some.
pub fn chunk_slot_rows(
    slot_nodes: &[usize],
    rows: usize,
    groups: &[Vec<usize>],
    chunk: usize,
) -> Vec<Vec<(usize, Range<usize>)>> {
    let fallback = groups.iter().position(|g| !g.is_empty()).unwrap_or(0);
    let mut chunks = vec![Vec::new(); groups.len().max(1)];
    for (slot, &n) in slot_nodes.iter().enumerate() {
        let n = if n < groups.len() && !groups[n].is_empty() {
            n
        } else {
            fallback
        };
        let mut r = 0;
        while r < rows {
            let end = (r + chunk).min(rows);
            chunks[n].push((slot, r..end));
            r = end;
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coverage(chunks: &[Vec<(usize, Range<usize>)>], slots: usize, rows: usize) -> Vec<usize> {
        let mut hits = vec![0usize; slots * rows];
        for node in chunks {
            for (s, r) in node {
                for i in r.clone() {
                    hits[s * rows + i] += 1;
                }
            }
        }
        hits
    }

    #[test]
    fn one_node_gets_every_row_once() {
        let groups = worker_groups(&[0, 0, 0, 0], 1);
        let chunks = chunk_slot_rows(&[0, 0, 0], 100, &groups, 32);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].len(), 3 * 4);
        assert!(coverage(&chunks, 3, 100).iter().all(|&h| h == 1));
    }

    #[test]
    fn two_nodes_keep_experts_on_their_node() {
        // Workers 0, 2 on node 0; 1, 3 on node 1. Slots alternate nodes.
        let groups = worker_groups(&[0, 1, 0, 1], 2);
        assert_eq!(groups, vec![vec![0, 2], vec![1, 3]]);
        let slot_nodes: Vec<usize> = (0..5).map(|e| expert_node(e, 2)).collect();
        let chunks = chunk_slot_rows(&slot_nodes, 40, &groups, 16);
        assert!(coverage(&chunks, 5, 40).iter().all(|&h| h == 1));
        for (n, node) in chunks.iter().enumerate() {
            for (s, _) in node {
                assert_eq!(
                    slot_nodes[*s], n,
                    "slot {s} of node {} queued on node {n}",
                    slot_nodes[*s]
                );
            }
        }
    }

    #[test]
    fn slots_of_a_node_without_workers_go_elsewhere() {
        let groups = worker_groups(&[0, 0], 2); // node 1 has no workers
        let chunks = chunk_slot_rows(&[0, 1, 1], 4, &groups, 2);
        assert!(chunks[1].is_empty());
        assert!(coverage(&chunks, 3, 4).iter().all(|&h| h == 1));
    }

    #[test]
    fn policy_names() {
        for p in ["auto", "interleave", "off"] {
            assert_eq!(NumaPolicy::parse(p).unwrap().name(), p);
        }
        assert!(NumaPolicy::parse("yes").is_err());
    }
}
