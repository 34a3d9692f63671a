"""Type stubs for krasis._core, the Rust CPU expert engine (see docs: CPU expert formats).

Arrays are numpy, C-contiguous; torch CPU tensors convert with ``.numpy()`` (bfloat16 is passed as
its uint16 bits: ``t.view(torch.uint16).numpy()``). Wrong shapes, dtypes, ids out of range or
non-contiguous inputs raise ValueError / TypeError. Heavy calls release the GIL.
"""


import numpy as np
import numpy.typing as npt

__version__: str

def simd_path() -> str:
    """The SIMD path the kernels use now: "avx512", "avx2" or "scalar"."""

def set_simd_path(name: str | None = None) -> None:
    """Force a path for later calls (ValueError if the CPU lacks it); None: KRASIS_SIMD / auto."""

def supported_simd_paths() -> list[str]:
    """Paths this CPU can run, fastest first."""

def set_num_threads(n: int) -> None:
    """Use n worker threads (re-creates the pool). Default: KRASIS_THREADS or physical cores."""

def num_threads() -> int: ...
def num_numa_nodes() -> int:
    """NUMA nodes the pool's workers span."""

def quantize(
    w: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16],
    bits: int,
    group_size: int = 128,
    dtype: str | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Quantise w [N, K] -> (packed weights uint8 [N, K*bits/8], scales float32 [N, K/group_size]).

    dtype ("f32", "f16", "bf16") is optional and must match the array (uint16 means bf16 bits).
    """

def dequantize(
    qweight: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    n: int,
    k: int,
    bits: int,
    group_size: int = 128,
) -> npt.NDArray[np.float32]:
    """Packed weights + scales -> float32 [N, K]."""

def matrix_layout(n: int, k: int, bits: int, group_size: int = 128) -> dict[str, int]:
    """Byte layout of one matrix block: offset, n, k, weights_nbytes, scales_offset, scales_nbytes, nbytes."""

def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best DRAM read rate in bytes/s, measured with the pool's pinned workers."""

def pool_dispatch_overhead(iters: int = 10000) -> float:
    """Mean seconds per dispatch of an empty job to the pool."""

def moe_phase_times() -> tuple[dict[str, float], int]:
    """Seconds spent per step of ExpertStore.forward since the last call (setup, gate_up, down,
    total) and the number of calls; resets the counters. For benchmarks."""

class QuantMatrix:
    """A quantised dense matrix W [N, K]; forward computes x @ W^T."""

    def __init__(
        self,
        qweight: npt.NDArray[np.uint8],
        scales: npt.NDArray[np.float32],
        n: int,
        k: int,
        bits: int,
        group_size: int = 128,
    ) -> None: ...
    @staticmethod
    def from_float(
        w: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16],
        bits: int,
        group_size: int = 128,
        dtype: str | None = None,
    ) -> QuantMatrix: ...
    def forward(self, x: npt.NDArray[np.float32], act_int8: bool = True) -> npt.NDArray[np.float32]:
        """x float32 [M, K] -> y float32 [M, N]."""
    @property
    def n(self) -> int: ...
    @property
    def k(self) -> int: ...
    @property
    def bits(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def nbytes(self) -> int: ...

class ExpertStore:
    """All routed experts of a model (layers x experts x gate/up/down), quantised, page-aligned."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        hidden: int,
        intermediate: int,
        bits: int,
        group_size: int = 128,
        numa: str = "auto",
    ) -> None:
        """numa: "auto" (expert e on node e % nodes), "interleave", or "off"."""
    def set_expert(
        self,
        layer: int,
        expert: int,
        gate: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16],
        up: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16],
        down: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16],
    ) -> None:
        """Quantise gate [I, H], up [I, H], down [H, I] into place."""
    def set_expert_quantized(
        self,
        layer: int,
        expert: int,
        gate_q: npt.NDArray[np.uint8],
        gate_s: npt.NDArray[np.float32],
        up_q: npt.NDArray[np.uint8],
        up_s: npt.NDArray[np.float32],
        down_q: npt.NDArray[np.uint8],
        down_s: npt.NDArray[np.float32],
    ) -> None:
        """Copy quantize() outputs for gate, up, down into place."""
    def set_expert_bytes(self, layer: int, expert: int, data: npt.NDArray[np.uint8]) -> None:
        """Copy one expert's packed bytes (expert_nbytes, as expert_view shows them) into place."""
    def expert_view(self, layer: int, expert: int) -> npt.NDArray[np.uint8]:
        """Read-only zero-copy view of one expert's packed bytes (keeps the store alive)."""
    def forward(
        self,
        layer: int,
        x: npt.NDArray[np.float32],
        expert_ids: npt.NDArray[np.int64] | npt.NDArray[np.int32],
        weights: npt.NDArray[np.float32],
        act_int8: bool = True,
    ) -> npt.NDArray[np.float32]:
        """y[t] = sum_j weights[t, j] * down(silu(gate x[t]) * up x[t]) for expert expert_ids[t, j]; [M, H]."""
    def serve_decode_graph(
        self,
        staged: npt.NDArray[np.float32],
        out: npt.NDArray[np.float32],
        flags: npt.NDArray[np.int64],
        layers: list[int],
        resident: npt.NDArray[np.int64],
        ids_out: npt.NDArray[np.int64],
        timeout_s: float = 30.0,
        act_int8: bool = True,
        claims: bool = False,
        hints: npt.NDArray[np.int64] | None = None,
        prefetch: tuple | None = None,
    ) -> tuple[int, int, float, float, int, int, int, int, float]:
        """Answer one decode step's handshakes with a GPU step graph (ADVANCED.md "Decode CUDA graphs"): for each MoE
        layer in ``layers``, wait until flags[0] reaches the next handshake number, read the staged row (x | weights
        | ids as float32, hidden + 2k values), run the experts with resident[layer, id] < 0 on the CPU, write their
        sum to ``out`` (hidden values) and raise flags[1]; every routed id goes to ids_out[j] ([len(layers), k]).
        With ``claims`` the row has k more values, nonzero for each pair the GPU computes itself (1.0: a prefetched
        expert, counted as claimed; 2.0: streamed over PCIe this step), which the host skips. With ``hints``
        (int64 [1 + n]: the handshake during which the GPU wrote them, then up to n expert ids of the next MoE
        layer, -1: none), having answered a layer the host reads those experts' weights ahead until the next layer
        is staged. With ``prefetch`` (predictions int64 [2, 1 + n]: per parity of the next MoE layer's index, the
        handshake during which the GPU wrote them, then up to n expert ids; each layer's expert source address,
        source stride, the two parities' staging addresses, staging stride, bytes per expert, the two copy flags'
        addresses, and the CUDA driver's (cuMemcpyHtoDAsync, cuStreamWriteValue64, cuCtxSetCurrent, context,
        stream) or None to copy in host memory: addresses of live buffers, as ``krasis.engine.prefetch`` builds
        them), having answered a layer the host queues copies of the predicted experts of the next into its
        staging slots, then the handshake's number to its flag. GIL released. Returns (CPU pairs, claimed
        pairs, seconds in the CPU kernels, seconds waiting for the GPU (reading ahead included), experts hinted
        (read in part or whole), CPU pairs whose expert had been hinted, bytes read ahead, experts whose copies
        were queued, seconds spent queuing them); RuntimeError when the GPU does not stage a layer (or write a
        prediction) within ``timeout_s`` or stages an id out of range."""
    def read_ahead(self, layer: int, experts: list[int]) -> int:
        """Read the weights of ``experts`` of ``layer`` into the CPU caches (the decode link's read-ahead); returns
        the bytes read."""
    def buffers(self) -> list[tuple[int, int]]:
        """(address, nbytes) of each layer's buffer, layer order."""
    def layout(self) -> dict:
        """expert_nbytes and, for gate/up/down, offset, n, k, weights_nbytes, scales_offset, scales_nbytes, nbytes."""
    @property
    def expert_nbytes(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def intermediate(self) -> int: ...
    @property
    def bits(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def numa(self) -> str: ...

# GGUF (llama.cpp) weights, read as stored; see ADVANCED.md "GGUF experts". Type ids are GGML's
# (gguf.GGMLQuantizationType): Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q2_K=10, Q3_K=11, Q4_K=12, Q5_K=13, Q6_K=14.

def gguf_supported_types() -> dict[str, tuple[int, int, int]]:
    """{type name: (GGML type id, values per block, bytes per block)} for every type with a kernel."""

def gguf_dequantize(data: npt.NDArray[np.uint8], ggml_type: int, n: int, k: int) -> npt.NDArray[np.float32]:
    """A GGUF weight [N, K] given as its raw blocks (N * K / block values, any shape, contiguous) -> float32 [N, K]."""

def gguf_matmul(
    data: npt.NDArray[np.uint8], ggml_type: int, n: int, k: int, x: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """y [M, N] = x [M, K] @ W^T with W given as raw GGUF blocks (f32 activations, the pool, the active SIMD path)."""

class GgufExpertStore:
    """Routed experts read in place from memory-mapped GGUF files.

    tensors[l] = [(file index, data offset, GGML type id)] * 3 for gate [E, I, H], up [E, I, H], down [E, H, I] of
    MoE layer l (numpy order). Sizes are checked against the files; an unsupported type is a ValueError listing the
    supported ones. krasis.gguf_experts.GgufExperts.open_store() builds one from a GGUF.
    """

    def __init__(
        self,
        paths: list[str],
        tensors: list[list[tuple[int, int, int]]],
        num_experts: int,
        hidden: int,
        intermediate: int,
    ) -> None: ...
    def forward(
        self,
        layer: int,
        x: npt.NDArray[np.float32],
        expert_ids: npt.NDArray[np.int64] | npt.NDArray[np.int32],
        weights: npt.NDArray[np.float32],
        act_int8: bool = True,
    ) -> npt.NDArray[np.float32]:
        """As ExpertStore.forward. act_int8: activations quantised per token to INT8 (groups of 32) and integer dot
        products for the types that have them (all but Q2_K, Q3_K); False: f32 activations throughout."""
    def serve_decode_graph(
        self,
        staged: npt.NDArray[np.float32],
        out: npt.NDArray[np.float32],
        flags: npt.NDArray[np.int64],
        layers: list[int],
        resident: npt.NDArray[np.int64],
        ids_out: npt.NDArray[np.int64],
        timeout_s: float = 30.0,
        act_int8: bool = True,
        claims: bool = False,
        hints: npt.NDArray[np.int64] | None = None,
        prefetch: tuple | None = None,
    ) -> tuple[int, int, float, float, int, int, int, int, float]:
        """As ExpertStore.serve_decode_graph (act_int8 as in forward)."""
    def dequantize_expert(self, layer: int, expert: int, which: int) -> npt.NDArray[np.float32]:
        """One expert's matrix as float32: which 0 = gate [I, H], 1 = up [I, H], 2 = down [H, I]."""
    def types(self) -> list[list[str]]:
        """Type names of gate, up, down per MoE layer."""
    def expert_nbytes(self, layer: int) -> int:
        """Stored bytes of one expert's gate + up + down in MoE layer `layer`."""
    @property
    def num_layers(self) -> int: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def intermediate(self) -> int: ...
