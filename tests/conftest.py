import os
from pathlib import Path

if not any(Path("/dev").glob("nvidia[0-9]*")):
    # Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be on before Triton
    # is first imported (torch or transformers may import it), so it is decided here, before torch.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import ALL, build_hf_model, save_tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def simd(request):
    """Each CPU kernel path in turn (skipped where this CPU lacks it), restored to the default afterwards."""
    from krasis import _core

    if request.param not in _core.supported_simd_paths():
        pytest.skip(f"this CPU cannot run the {request.param} path (has {_core.supported_simd_paths()})")
    _core.set_simd_path(request.param)
    yield request.param
    _core.set_simd_path(None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """name -> (transformers model in float32, directory of its saved checkpoint), built once per session."""
    built = {}

    def get(name: str):
        if name not in built:
            family, overrides = ALL[name]
            model = build_hf_model(family, overrides)
            built[name] = (model, save_tiny(model, tmp_path_factory.mktemp(name)))
        return built[name]

    return get


def pytest_configure(config):
    # Tests never touch the user's ~/.krasis: models and caches they write go to a throwaway home.
    import os
    import tempfile

    config._krasis_test_home = tempfile.mkdtemp(prefix="krasis-test-home-")
    os.environ["KRASIS_HOME"] = config._krasis_test_home


def pytest_unconfigure(config):
    import shutil

    home = getattr(config, "_krasis_test_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def krasis_server(tiny_checkpoint, tmp_path_factory):
    """A real server subprocess on 127.0.0.1 serving the qwen3_moe_mixed tiny checkpoint (float32)."""
    from server_process import start_server

    _, path = tiny_checkpoint("qwen3_moe_mixed")
    server = start_server(path, tmp_path_factory.mktemp("server-home"))
    yield server
    server.stop()
