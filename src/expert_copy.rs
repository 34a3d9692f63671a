//! Copies of routed experts into VRAM staging slots that the host queues during a decode step.
//!
//! A CUDA graph cannot give a copy engine an address it computes, so a prefetch decided inside the
//! step graph was copied by a kernel that read pinned host memory, holding SMs and slowing the kernels
//! beside it. Here the host, which reads the GPU's prediction from mapped memory anyway, queues the
//! copies itself on a copy engine (the CUDA driver's `cuMemcpyHtoDAsync` on a stream of its own) and
//! then a write of the handshake number to a flag (`cuStreamWriteValue64`, ordered after the copies)
//! that the graph polls before it runs the copied experts. Without CUDA (tests, the Triton
//! interpreter) the same calls copy with `memcpy` and store the flag at once.
//!
//! The driver's entry points come from the caller as addresses (Python resolves them in `libcuda`
//! through ctypes), so the extension neither links CUDA nor needs it to build.

use std::ffi::c_void;
use std::sync::atomic::{AtomicI64, Ordering};

type MemcpyHtoD = unsafe extern "C" fn(u64, *const c_void, usize, *mut c_void) -> i32;
type WriteValue64 = unsafe extern "C" fn(*mut c_void, u64, u64, u32) -> i32;
type SetContext = unsafe extern "C" fn(*mut c_void) -> i32;

/// The CUDA driver calls and handles the copies are queued with.
#[derive(Clone, Copy)]
pub struct Driver {
    memcpy: MemcpyHtoD,
    write_value: WriteValue64,
    set_context: SetContext,
    context: *mut c_void,
    stream: *mut c_void,
}

impl Driver {
    /// From the addresses of `cuMemcpyHtoDAsync_v2`, `cuStreamWriteValue64(_v2)` and `cuCtxSetCurrent`,
    /// the context (`CUcontext`) and the stream (`CUstream`) to queue on.
    ///
    /// # Safety
    /// The three addresses are those driver functions (with the C signatures above), and the context
    /// and stream stay valid while the Driver is used.
    pub unsafe fn new(
        memcpy: usize,
        write_value: usize,
        set_context: usize,
        context: usize,
        stream: usize,
    ) -> Result<Driver, String> {
        if memcpy == 0 || write_value == 0 || set_context == 0 || context == 0 {
            return Err("a CUDA driver entry point or the context is null".into());
        }
        // SAFETY: the caller's contract: nonzero addresses of functions of exactly these signatures.
        unsafe {
            Ok(Driver {
                memcpy: std::mem::transmute::<usize, MemcpyHtoD>(memcpy),
                write_value: std::mem::transmute::<usize, WriteValue64>(write_value),
                set_context: std::mem::transmute::<usize, SetContext>(set_context),
                context: context as *mut c_void,
                stream: stream as *mut c_void,
            })
        }
    }
}

// SAFETY: the handles are plain addresses that the CUDA driver accepts from any thread (its API is
// thread-safe), and `Driver::new`'s contract keeps them valid while used.
unsafe impl Send for Driver {}
unsafe impl Sync for Driver {}

/// Where the copies go: one layer's experts, `nbytes` each, at `src[layer] + id * src_stride`, to the
/// staging slot `i` of parity `p` at `dst[p] + i * dst_stride`; then `flags[p]` receives the handshake.
pub struct ExpertCopies {
    driver: Option<Driver>,
    src: Vec<usize>,
    src_stride: usize,
    dst: [usize; 2],
    dst_stride: usize,
    nbytes: usize,
    flags: [usize; 2],
    slots: usize,
    num_experts: usize,
}

impl ExpertCopies {
    /// `src[layer]`: the address of layer `layer`'s first of `num_experts` experts; `slots` staging slots
    /// per parity.
    /// With `driver`, `dst` and `flags` are device addresses (the flags may be mapped host memory);
    /// without, everything is host memory and the copies are immediate.
    ///
    /// # Safety
    /// For every layer, `num_experts` experts of `nbytes` at `src_stride` apart are readable at
    /// `src[layer]`; `slots` slots of `nbytes` at `dst_stride` apart are writable at each `dst[p]`;
    /// each `flags[p]` is an aligned i64; all stay valid, and are not otherwise written while copies
    /// are queued (the GPU only reads the slots after the flag says they landed).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn new(
        driver: Option<Driver>,
        src: Vec<usize>,
        src_stride: usize,
        dst: [usize; 2],
        dst_stride: usize,
        nbytes: usize,
        flags: [usize; 2],
        slots: usize,
        num_experts: usize,
    ) -> Result<ExpertCopies, String> {
        if nbytes == 0 || src_stride < nbytes || (slots > 1 && dst_stride < nbytes) {
            return Err(format!(
                "expert copies of {nbytes} bytes need strides of at least that (source {src_stride}, staging {dst_stride})"
            ));
        }
        if flags.iter().any(|&f| f == 0 || f % 8 != 0) {
            return Err("the copies' flags must be aligned i64".into());
        }
        if src.contains(&0) || dst.contains(&0) {
            return Err("a null expert source or staging address".into());
        }
        Ok(ExpertCopies {
            driver,
            src,
            src_stride,
            dst,
            dst_stride,
            nbytes,
            flags,
            slots,
            num_experts,
        })
    }

    /// Make the driver's context current on this thread (the serving thread may be a new one).
    pub fn begin(&self) -> Result<(), String> {
        if let Some(d) = &self.driver {
            // SAFETY: `Driver::new`'s contract: a valid cuCtxSetCurrent and context.
            check(unsafe { (d.set_context)(d.context) }, "cuCtxSetCurrent")?;
        }
        Ok(())
    }

    /// Queue the copies of `ids` (expert i into slot i; `None`: nothing for that slot) of `layer` into the
    /// slots of `parity`, then the write of `seq` to its flag. Returns the experts copied; an id out of
    /// range is an error (nothing queued).
    pub fn copy_layer(
        &self,
        layer: usize,
        parity: usize,
        ids: &[Option<usize>],
        seq: i64,
    ) -> Result<usize, String> {
        let base = *self
            .src
            .get(layer)
            .ok_or_else(|| format!("no expert source for MoE layer {layer}"))?;
        if let Some(e) = ids.iter().flatten().find(|&&e| e >= self.num_experts) {
            return Err(format!(
                "expert {e} of MoE layer {layer} to copy (valid: 0..{})",
                self.num_experts
            ));
        }
        if ids.len() > self.slots {
            return Err(format!(
                "{} experts to copy, {} staging slots",
                ids.len(),
                self.slots
            ));
        }
        let (dst, flag) = (self.dst[parity % 2], self.flags[parity % 2]);
        let mut copied = 0;
        for (i, id) in ids.iter().enumerate() {
            let Some(e) = *id else { continue };
            let (from, to) = (base + e * self.src_stride, dst + i * self.dst_stride);
            match &self.driver {
                // SAFETY: `new`'s contract: the source expert is readable, the slot writable (the id and
                // i were checked against `num_experts` and `slots` above).
                Some(d) => check(
                    unsafe { (d.memcpy)(to as u64, from as *const c_void, self.nbytes, d.stream) },
                    "cuMemcpyHtoDAsync",
                )?,
                // SAFETY: as above, in host memory; source and staging never overlap.
                None => unsafe {
                    std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, self.nbytes)
                },
            }
            copied += 1;
        }
        match &self.driver {
            // SAFETY: `new`'s contract: an aligned i64 the device can write.
            Some(d) => check(
                unsafe { (d.write_value)(d.stream, flag as u64, seq as u64, 0) },
                "cuStreamWriteValue64",
            )?,
            // SAFETY: as above, in host memory; Release: the copies are visible before the flag.
            None => unsafe { &*(flag as *const AtomicI64) }.store(seq, Ordering::Release),
        }
        Ok(copied)
    }
}

fn check(rc: i32, call: &str) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{call} failed with CUDA error {rc}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_copies_land_in_their_slots_then_the_flag_is_raised() {
        let (n, e) = (16usize, 4usize);
        let src: Vec<Vec<u8>> = (0..2)
            .map(|l| (0..n * e).map(|i| (i + 100 * l) as u8).collect())
            .collect();
        let mut staging = vec![0u8; 2 * 2 * n]; // 2 parities x 2 slots
        let mut flags = [0i64; 2];
        // SAFETY: the buffers outlive the copies and are only touched through them meanwhile.
        let copies = unsafe {
            ExpertCopies::new(
                None,
                src.iter().map(|s| s.as_ptr() as usize).collect(),
                n,
                [
                    staging.as_mut_ptr() as usize,
                    staging.as_mut_ptr() as usize + 2 * n,
                ],
                n,
                n,
                [flags.as_mut_ptr() as usize, flags.as_mut_ptr() as usize + 8],
                2,
                4,
            )
            .unwrap()
        };
        copies.begin().unwrap();
        assert_eq!(copies.copy_layer(1, 1, &[None, Some(3)], 7).unwrap(), 1);
        assert_eq!(&staging[3 * n..4 * n], &src[1][3 * n..4 * n]);
        assert!(
            staging[..3 * n].iter().all(|&b| b == 0),
            "other slots untouched"
        );
        assert_eq!(flags, [0, 7]);
        let err = copies.copy_layer(0, 0, &[Some(0), Some(1), Some(2)], 8);
        assert!(err
            .unwrap_err()
            .contains("3 experts to copy, 2 staging slots"));
        let err = copies.copy_layer(0, 0, &[Some(4)], 8).unwrap_err();
        assert!(err.contains("expert 4 of MoE layer 0 to copy"), "{err}");
        assert_eq!(flags, [0, 7], "nothing queued for a refused layer");
    }
}
