//! NUMA placement: which node holds each expert, binding memory to nodes (mbind), and the plans
//! that give each worker the rows of the experts on its own node. On a one-node machine every
//! plan degenerates to an even split over all workers.

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

/// Orders work items by the node that runs them, keeping their order within a node: `order` gets
/// the item indices, node n's at `order[start[n]..start[n + 1]]`.
pub fn order_by_node(
    item_nodes: impl Iterator<Item = usize> + Clone,
    num_nodes: usize,
    order: &mut Vec<usize>,
    start: &mut Vec<usize>,
) {
    start.clear();
    start.resize(num_nodes + 1, 0);
    for n in item_nodes.clone() {
        start[n + 1] += 1;
    }
    for n in 0..num_nodes {
        start[n + 1] += start[n];
    }
    order.clear();
    order.resize(start[num_nodes], 0);
    // Place each item at its node's cursor (start[n], advanced past it: it ends at the next
    // node's start), then shift the starts back into place.
    for (i, n) in item_nodes.enumerate() {
        order[start[n]] = i;
        start[n] += 1;
    }
    start.copy_within(..num_nodes, 1);
    start[0] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ordered(nodes: &[usize], num_nodes: usize) -> (Vec<usize>, Vec<usize>) {
        let (mut order, mut start) = (vec![7; 3], vec![7; 9]); // stale contents are overwritten
        order_by_node(nodes.iter().copied(), num_nodes, &mut order, &mut start);
        (order, start)
    }

    #[test]
    fn one_node_keeps_the_order() {
        assert_eq!(ordered(&[0, 0, 0, 0], 1), (vec![0, 1, 2, 3], vec![0, 4]));
        assert_eq!(ordered(&[], 1), (vec![], vec![0, 0]));
    }

    #[test]
    fn items_are_grouped_by_node_in_their_order() {
        let nodes: Vec<usize> = (0..5).map(|e| expert_node(e, 2)).collect();
        assert_eq!(ordered(&nodes, 2), (vec![0, 2, 4, 1, 3], vec![0, 3, 5]));
        // A node without items gets an empty range.
        assert_eq!(ordered(&[2, 0, 2], 3), (vec![1, 0, 2], vec![0, 1, 1, 3]));
    }

    #[test]
    fn policy_names() {
        for p in ["auto", "interleave", "off"] {
            assert_eq!(NumaPolicy::parse(p).unwrap().name(), p);
        }
        assert!(NumaPolicy::parse("yes").is_err());
    }
}
