"""The split-S Triton MLA decode kernel against a float64 reference over the dequantised cache.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py when there is no GPU) with
small dimensions, and on CUDA (-m gpu), where the dots take bfloat16 operands, also at DeepSeek-V2-Lite's sizes
and inside a CUDA graph."""

import math
import os

import pytest
import torch

from krasis.engine.kv_cache import _to_fp8
from krasis.kernels.mla_decode import mla_decode_attention, split_plan

H, R, DR = 4, 64, 16  # small enough for the interpreter


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is visible, so the kernel is compiled rather than interpreted; see -m gpu")
    return torch.device(request.param)


def tolerance(device: torch.device, dtype: torch.dtype) -> float:
    """Bound on max |error| / max |reference|: bfloat16 dot operands on CUDA, float32 under the interpreter
    (where a bfloat16 cache is exact in float32)."""
    return 2e-2 if device.type == "cuda" else 1e-5


class Case:
    """Random queries and one layer's cache (fresh values per seed, never zeros)."""

    def __init__(self, device: torch.device, cap: int, dtype: torch.dtype = torch.float32, kv: str = "auto",
                 h: int = H, r: int = R, dr: int = DR, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.device, self.dtype, self.kv = device, dtype, kv
        self.q_lat = torch.randn(h, r, generator=g).to(device, dtype)
        self.q_pe = torch.randn(h, dr, generator=g).to(device, dtype)
        # shifted so that the outputs (weighted means of latents) are far from zero
        self.latent = (torch.randn(cap, r, generator=g) + 0.5).to(device, dtype)
        self.k_pe = torch.randn(cap, dr, generator=g).to(device, dtype)
        self.scale = 1.0 / math.sqrt(r + dr)
        self.latent_scale = self.k_pe_scale = None
        if kv == "fp8":
            self.latent, self.latent_scale = _to_fp8(self.latent)
            self.k_pe, self.k_pe_scale = _to_fp8(self.k_pe)

    def dequantised(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv == "fp8":
            return (self.latent.double() * self.latent_scale.double()[:, None],
                    self.k_pe.double() * self.k_pe_scale.double()[:, None])
        return self.latent.double(), self.k_pe.double()

    def run(self, position: int, span: int, **kw) -> torch.Tensor:
        pos = torch.tensor([position], dtype=torch.int64, device=self.device)
        return mla_decode_attention(self.q_lat, self.q_pe, self.latent, self.latent_scale, self.k_pe, self.k_pe_scale,
                                    pos, span, self.scale, **kw)

    def reference(self, position: int) -> torch.Tensor:
        latent, k_pe = (t[: position + 1].cpu() for t in self.dequantised())
        scores = (self.q_lat.double().cpu() @ latent.T + self.q_pe.double().cpu() @ k_pe.T) * self.scale
        return torch.softmax(scores, dim=-1) @ latent

    def check(self, position: int, span: int, **kw) -> torch.Tensor:
        out = self.run(position, span, **kw)
        assert out.shape == self.q_lat.shape and out.dtype == torch.float32
        ref = self.reference(position)
        err = (out.double().cpu() - ref).abs().max() / ref.abs().max()
        assert err < tolerance(self.device, self.dtype), f"relative error {err:.2e}"
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_dtype_cache_matches_the_reference(device, dtype):
    Case(device, 300, dtype).check(position=150, span=300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_with_per_token_scales_matches_the_dequantised_reference(device, dtype):
    Case(device, 300, dtype, kv="fp8", seed=1).check(position=200, span=300)


@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("magnitude", [1e6, 1e-6])
def test_queries_far_outside_float16_range_give_the_same_result(device, kv, magnitude):
    # on CUDA an FP8 cache's dots take float16 operands: the query must be brought into range first
    case = Case(device, 256, torch.bfloat16, kv=kv, seed=13)
    case.check(position=200, span=256)
    case.q_lat, case.q_pe, case.scale = case.q_lat * magnitude, case.q_pe * magnitude, case.scale / magnitude
    case.check(position=200, span=256)


def test_a_bfloat16_output_is_the_float32_output_rounded(device):
    case = Case(device, 300, torch.bfloat16, seed=3)
    wide = case.check(position=150, span=300)
    assert torch.equal(case.run(150, 300, out_dtype=torch.bfloat16), wide.to(torch.bfloat16))


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_position_zero_returns_the_first_latent(device, kv):
    case = Case(device, 256, kv=kv, seed=2)
    out = case.check(position=0, span=256)
    first = case.dequantised()[0][0].float().cpu()
    assert torch.allclose(out.cpu(), first.expand_as(out), rtol=tolerance(device, torch.float32), atol=0)


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_position_at_the_last_key_of_the_span_sees_every_key(device, kv):
    Case(device, 256, kv=kv, seed=3).check(position=255, span=256)


def test_span_that_is_not_a_multiple_of_the_block_masks_its_last_block(device):
    # 200 = 3 blocks of 64 + 8, in a cache of 256 whose tail holds ordinary keys
    Case(device, 256, seed=4).check(position=199, span=200)


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_entries_past_the_position_do_not_change_the_result(device, kv):
    case = Case(device, 256, kv=kv, seed=5)
    position = 100
    clean = case.check(position, span=256)
    if kv == "fp8":
        case.latent.view(torch.uint8)[position + 1:] = 0x7E  # 448, the largest value
        case.k_pe.view(torch.uint8)[position + 1:] = 0x7F  # NaN
        case.latent_scale[position + 1:] = 1e30
        case.k_pe_scale[position + 1:] = float("nan")
    else:
        case.latent[position + 1:] = 1e30
        case.latent[-1] = float("inf")
        case.k_pe[position + 1:] = float("nan")
    assert torch.equal(case.run(position, span=256), clean)


def test_splits_wholly_past_the_position_contribute_nothing(device):
    # span 2048 gives 32 splits of one block; a position in the first block leaves 31 of them empty
    out = Case(device, 2048, seed=6).check(position=10, span=2048)
    assert torch.isfinite(out).all()


def test_many_splits_over_a_long_span(device):
    Case(device, 2048, seed=7).check(position=1500, span=2048)


def test_splits_looping_over_several_blocks(device):
    # 1000 keys in blocks of 16: 63 blocks, 8 splits of 8 blocks (the last one short and cut by the span)
    assert split_plan(1000, block_s=16, max_splits=8) == (8, 8)
    Case(device, 1024, seed=8).check(position=990, span=1000, block_s=16, max_splits=8)


def test_sixteen_heads(device):
    Case(device, 256, h=16, seed=9).check(position=180, span=256)


def test_head_count_that_is_not_a_power_of_two_is_padded(device):
    Case(device, 256, h=20, seed=10).check(position=180, span=256)


def test_split_plan_grows_the_split_count_with_the_span():
    assert split_plan(256) == (4, 1)
    assert split_plan(300) == (5, 1)
    assert split_plan(2048) == (32, 1)
    assert split_plan(8192) == (128, 1)
    assert split_plan(16384) == (128, 2)
    assert split_plan(32768 + 64) == (103, 5)  # 513 blocks


@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("r,dr", [(24, 8), (48, 16), (64, 24)])
def test_latent_and_rope_widths_that_are_not_powers_of_two_are_padded(device, kv, r, dr):
    Case(device, 256, kv=kv, h=3, r=r, dr=dr, seed=12).check(position=150, span=256)


def test_a_block_that_cannot_be_a_dot_side_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        Case(torch.device("cpu"), 256).run(10, 256, block_s=24)


def test_span_beyond_the_capacity_is_refused():
    with pytest.raises(ValueError, match="span"):
        Case(torch.device("cpu"), 256).run(10, 512)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("span,position", [(256, 200), (16384, 16000), (32768, 5000)])
def test_deepseek_v2_lite_sizes_on_cuda(kv, span, position):
    Case(torch.device("cuda"), span, torch.bfloat16, kv=kv, h=16, r=512, dr=64, seed=11).check(position, span)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_one_cuda_graph_serves_every_position_of_its_span(kv):
    case = Case(torch.device("cuda"), 4096, torch.bfloat16, kv=kv, h=16, r=512, dr=64, seed=12)
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")

    def step():
        return mla_decode_attention(case.q_lat, case.q_pe, case.latent, case.latent_scale, case.k_pe,
                                    case.k_pe_scale, pos, 4096, case.scale)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for position in (0, 63, 64, 1000, 4095):
        pos.fill_(position)
        graph.replay()
        ref = case.reference(position)
        err = (out.double().cpu() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, f"position {position}: relative error {err:.2e}"
