//! CPU topology from Linux sysfs: the CPUs this process may use, one per physical core, and the
//! NUMA node of each. Falls back to `available_parallelism` CPUs on one node when sysfs is absent.

use std::fs;

/// Parse a sysfs CPU list such as "0-3,8,10-11".
pub fn parse_cpulist(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(a) = part.trim().parse() {
                    out.push(a);
                }
            }
        }
    }
    out
}

/// CPUs this process may run on (sched_getaffinity), ascending.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain bits, so zeroed is a valid value; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it, and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect();
            if !cpus.is_empty() {
                return cpus;
            }
        }
    }
    (0..std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1))
        .collect()
}

fn read_usize(path: &str) -> Option<usize> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// One allowed CPU per physical core (the lowest-numbered SMT sibling), ascending.
pub fn physical_cores() -> Vec<usize> {
    let allowed = allowed_cpus();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for &c in &allowed {
        let base = format!("/sys/devices/system/cpu/cpu{c}/topology");
        let key = match (
            read_usize(&format!("{base}/physical_package_id")),
            read_usize(&format!("{base}/core_id")),
        ) {
            (Some(p), Some(core)) => (p, core),
            _ => return allowed, // no topology information: treat every CPU as a core
        };
        if seen.insert(key) {
            out.push(c);
        }
    }
    out
}

/// NUMA node of each CPU as read from /sys/devices/system/node (empty if absent).
pub fn numa_nodes() -> Vec<(usize, Vec<usize>)> {
    let mut nodes = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/devices/system/node") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(id) = name
                .strip_prefix("node")
                .and_then(|s| s.parse::<usize>().ok())
            {
                if let Ok(list) = fs::read_to_string(e.path().join("cpulist")) {
                    nodes.push((id, parse_cpulist(&list)));
                }
            }
        }
    }
    nodes.sort();
    nodes
}

/// The machine as the pool sees it: the CPUs to pin workers to and the node of each.
#[derive(Clone, Debug)]
pub struct Topology {
    /// (cpu, node) for each physical core this process may use, ordered so that the first n
    /// entries spread evenly over the nodes (node 0 core, node 1 core, ..., node 0 core, ...).
    pub cores: Vec<(usize, usize)>,
    /// Number of NUMA nodes with at least one usable core.
    pub num_nodes: usize,
}

impl Topology {
    pub fn detect() -> Topology {
        let nodes = numa_nodes();
        let node_of = |cpu: usize| {
            nodes
                .iter()
                .find(|(_, cpus)| cpus.contains(&cpu))
                .map(|(n, _)| *n)
                .unwrap_or(0)
        };
        Topology::from_cores(
            physical_cores()
                .into_iter()
                .map(|c| (c, node_of(c)))
                .collect(),
        )
    }

    /// Order (cpu, node) pairs round-robin over nodes and renumber nodes 0..num_nodes.
    pub fn from_cores(cores: Vec<(usize, usize)>) -> Topology {
        let mut ids: Vec<usize> = cores.iter().map(|c| c.1).collect();
        ids.sort();
        ids.dedup();
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); ids.len()];
        for (cpu, node) in &cores {
            per_node[ids.binary_search(node).unwrap()].push(*cpu);
        }
        let mut ordered = Vec::new();
        let longest = per_node.iter().map(|v| v.len()).max().unwrap_or(0);
        for i in 0..longest {
            for (n, cpus) in per_node.iter().enumerate() {
                if let Some(c) = cpus.get(i) {
                    ordered.push((*c, n));
                }
            }
        }
        if ordered.is_empty() {
            ordered.push((0, 0));
        }
        Topology {
            num_nodes: ids.len().max(1),
            cores: ordered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulist_parsing() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist(""), Vec::<usize>::new());
    }

    #[test]
    fn cores_round_robin_over_nodes() {
        let t = Topology::from_cores(vec![(0, 0), (1, 0), (2, 1), (3, 1), (4, 0)]);
        assert_eq!(t.num_nodes, 2);
        assert_eq!(t.cores, vec![(0, 0), (2, 1), (1, 0), (3, 1), (4, 0)]);
    }

    #[test]
    fn this_machine_has_cores() {
        let t = Topology::detect();
        assert!(!t.cores.is_empty());
        assert!(t.num_nodes >= 1);
    }
}
