"""The TUI launcher driven headless through textual's Pilot, and the saved config it writes."""

import asyncio

import pytest
from textual.widgets import DataTable, Input, OptionList, SelectionList, Static

from krasis.launcher.config import ConfigError, config_path, defaults, load_config, save_config
from krasis.launcher.gpus import GpuInfo
from krasis.launcher.tui import ConfigScreen, GpuScreen, LauncherApp, ModelScreen, SourceScreen

FAKE_GPUS = [GpuInfo(0, "Fake GPU A", 20000, 24000), GpuInfo(1, "Fake GPU B", 10000, 12000)]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KRASIS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def models(tiny_checkpoint, tmp_path):
    """A folder of two tiny checkpoints, a GGUF beside the first and a model of an unsupported architecture."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "a-qwen").symlink_to(tiny_checkpoint("qwen3_moe_mixed")[1])
    (root / "b-deepseek").symlink_to(tiny_checkpoint("deepseek_v2_lite_like")[1])
    (root / "a-qwen-Q4_K_M.gguf").write_bytes(b"GGUF")
    broken = root / "c-madeup"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["MadeUpForCausalLM"]}')
    return root


def text_of(screen, selector) -> str:
    return str(screen.query_one(selector, Static).render())


async def set_input(pilot, screen, name, value):
    screen.query_one(f"#opt-{name}", Input).value = value
    await pilot.pause()


def test_four_screens_select_refuse_save_and_reload(home, models):
    config = defaults()
    config["models_dir"] = str(models)

    async def first_run():
        app = LauncherApp(config, gpus=FAKE_GPUS)
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, ModelScreen)
            table = screen.query_one(DataTable)
            assert table.row_count == 3
            qwen = [str(c) for c in table.get_row_at(0)]
            assert qwen[:3] == ["a-qwen", "Qwen3MoeForCausalLM", "4"] and qwen[4] == "8/0/2" and "GGUF" in qwen[-1]
            assert qwen[3].startswith("GQA") and qwen[5].startswith("softmax top-2 of 8")
            deepseek = [str(c) for c in table.get_row_at(1)]
            assert deepseek[3].startswith("MLA") and deepseek[4] == "8/2/3"
            await pilot.press("down", "down", "enter")  # the unsupported model is refused with the reason
            assert app.screen is screen and "not supported" in text_of(screen, "#status")
            await pilot.press("up", "up", "enter")
            assert isinstance(app.screen, SourceScreen)
            options = app.screen.query_one(OptionList)
            assert options.option_count == 4  # INT4, INT8, BF16 and the GGUF found beside the model
            await pilot.press("home", "enter")
            assert isinstance(app.screen, GpuScreen)
            await pilot.press("down", "space", "enter")  # GPU 0 preselected, add GPU 1
            screen = app.screen
            assert isinstance(screen, ConfigScreen)
            assert app.config["gpus"] == [0, 1] and app.config["device"] == "cuda"
            budget = text_of(screen, "#budget")
            assert "GPU 0 (Fake GPU A)" in budget and "issue 12" in budget and "Estimated maximum context" in budget
            await set_input(pilot, screen, "kv_dtype", "fp4")
            assert "refused" in text_of(screen, "#err-kv_dtype") and "auto, bf16, fp8" in text_of(screen,
                                                                                                  "#err-kv_dtype")
            await set_input(pilot, screen, "port", "99999")
            assert "<= 65535" in text_of(screen, "#err-port")
            await pilot.click("#serve")
            assert app.is_running and "Fix the refused values" in text_of(screen, "#status")
            await set_input(pilot, screen, "kv_dtype", "fp8")
            await set_input(pilot, screen, "port", "8100")
            await set_input(pilot, screen, "vram_budget_mb", "2048")
            assert "budget 2,048 MiB" in text_of(screen, "#budget")
            await set_input(pilot, screen, "vram_budget_mb", "100")  # too small: the plan says why, live
            assert "Does not fit" in text_of(screen, "#budget")
            await set_input(pilot, screen, "vram_budget_mb", "2048")
            assert text_of(screen, "#err-kv_dtype") == ""
            screen.query_one("#benchmark").press()
            await pilot.pause()
        return app.return_value

    action, chosen = asyncio.run(first_run())
    assert action == "benchmark"
    saved = load_config()
    assert saved == chosen
    assert saved["model_path"] == str(models / "a-qwen") and saved["cpu_expert_bits"] == 4
    assert (saved["gpus"], saved["device"], saved["kv_dtype"], saved["port"], saved["vram_budget_mb"]) == \
        ([0, 1], "cuda", "fp8", 8100, 2048)

    async def second_run():  # reloaded: the saved choices are where the screens start; no GPU this time
        app = LauncherApp(load_config(), gpus=[])
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause()
            await pilot.press("enter")  # cursor starts on the saved model
            assert app.model.name == "a-qwen"
            assert app.screen.query_one(OptionList).highlighted == 0  # INT4, as saved
            await pilot.press("enter")
            assert "No CUDA GPU" in text_of(app.screen, "#no-gpu")
            await pilot.press("enter")
            screen = app.screen
            assert isinstance(screen, ConfigScreen) and app.config["device"] == "cpu"
            assert screen.query_one("#opt-kv_dtype", Input).value == "fp8"
            assert screen.query_one("#opt-port", Input).value == "8100"
            screen.query_one("#serve").press()
            await pilot.pause()
        return app.return_value

    action, chosen = asyncio.run(second_run())
    assert action == "serve" and chosen["device"] == "cpu" and load_config()["gpus"] == []


def test_invalid_config_names_file_key_and_expected_value_and_tui_starts_from_defaults(home):
    path = config_path()
    path.parent.mkdir(parents=True)
    path.write_text('kv_dtype = "fp4"\n')
    with pytest.raises(ConfigError) as e:
        load_config()
    assert str(path) in str(e.value) and "'kv_dtype'" in str(e.value) and "one of auto, bf16, fp8" in str(e.value)
    path.write_text("port = [1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config()

    async def run():
        app = LauncherApp(defaults(), gpus=[], problem="bad config: starting from the defaults")
        async with app.run_test() as pilot:
            await pilot.pause()
            assert "starting from the defaults" in text_of(app.screen, "#problem")
            assert "No models found" in text_of(app.screen, "#status")
            await pilot.press("q")

    asyncio.run(run())


def test_config_round_trip_keeps_types_and_leaves_engine_choices_out(home):
    config = defaults()
    config.update(cpu_expert_bits=8, hcs=False, gpus=[1], kv_cache_mb=512)
    path = save_config(config)
    text = path.read_text()
    assert "vram_budget_mb" not in text and "kv_cache_mb = 512" in text and "hcs = false" in text
    assert load_config() == config


def test_gpu_screen_selection_list_toggles_with_space(home, models):
    config = defaults()
    config["models_dir"] = str(models)

    async def run():
        app = LauncherApp(config, gpus=FAKE_GPUS)
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause()
            await pilot.press("enter", "enter")
            assert list(app.screen.query_one(SelectionList).selected) == [0]
            await pilot.press("space", "enter")  # none selected: the CPU path
            assert app.config["device"] == "cpu" and app.config["gpus"] == []
            await pilot.press("q")

    asyncio.run(run())


async def _to_gguf_settings(app, pilot):
    """From the first screen: the first model, its GGUF, the GPU screen; ends on the settings screen."""
    await pilot.pause()
    await pilot.press("enter")
    options = app.screen.query_one(OptionList)
    assert "GGUF a-qwen-Q4_K_M.gguf" in str(options.get_option_at_index(3).prompt)
    await pilot.press("end", "enter")
    assert isinstance(app.screen, GpuScreen)
    assert "a-qwen-Q4_K_M.gguf" in text_of(app.screen, "#gguf-note") and app.screen.query(SelectionList)
    await pilot.press("enter")  # the GPU chosen by default: the GPU engine beside the GGUF's CPU experts
    assert isinstance(app.screen, ConfigScreen)


def test_choosing_a_gguf_beside_the_model_saves_it_with_the_gpu_chosen(home, models):
    config = defaults()
    config.update(models_dir=str(models), cpu_expert_bits=4)

    async def run():
        app = LauncherApp(config, gpus=FAKE_GPUS)
        async with app.run_test(size=(200, 60)) as pilot:
            await _to_gguf_settings(app, pilot)
            assert "CPU experts: GGUF a-qwen-Q4_K_M.gguf" in text_of(app.screen, "#budget")
            app.screen.query_one("#serve").press()
            await pilot.pause()
        return app.return_value

    action, chosen = asyncio.run(run())
    assert action == "serve" and load_config() == chosen
    assert (chosen["gguf_path"], chosen["cpu_expert_bits"], chosen["device"], chosen["gpus"]) == \
        (str(models / "a-qwen-Q4_K_M.gguf"), 16, "cuda", [0])


def test_saved_gguf_is_the_highlighted_source_when_the_model_is_chosen_again(home, models):
    config = defaults()
    config.update(models_dir=str(models), model_path=str(models / "a-qwen"),
                  gguf_path=str(models / "a-qwen-Q4_K_M.gguf"))

    async def run():
        app = LauncherApp(config, gpus=[])
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause()
            await pilot.press("enter")
            assert app.screen.query_one(OptionList).highlighted == 3
            await pilot.press("q")

    asyncio.run(run())


def test_settings_refuse_to_launch_quantised_experts_with_a_gguf(home, models):
    config = defaults()
    config["models_dir"] = str(models)

    async def run():
        app = LauncherApp(config, gpus=FAKE_GPUS)
        async with app.run_test(size=(200, 60)) as pilot:
            await _to_gguf_settings(app, pilot)
            screen = app.screen
            await set_input(pilot, screen, "cpu_expert_bits", "4")
            screen.query_one("#serve").press()
            await pilot.pause()
            assert app.is_running and "set cpu_expert_bits to 16" in text_of(screen, "#status")
            assert not config_path().exists()
            await pilot.press("escape", "escape", "escape", "q")

    asyncio.run(run())
