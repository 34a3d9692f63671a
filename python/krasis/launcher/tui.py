"""The ``krasis`` TUI (textual): four screens, each one decision.

1. ModelScreen: the models found under ~/.krasis/models (and --models-dir), with their shapes and estimated RAM.
2. SourceScreen: where the CPU experts come from: INT4 / INT8 built from the model, BF16, or a GGUF beside it
   (saved as ``gguf_path``; with GPUs the GPU engine runs beside it, its own experts built from the model).
3. GpuScreen: which GPUs (Space toggles, Enter confirms); a machine without one gets the CPU path.
4. ConfigScreen: every quantisation and runtime option, refused in place when invalid, with the live VRAM plan
   and estimated maximum context; it saves the settings and ends with "launch the server" or "benchmark first".

``LauncherApp(config).run()`` returns None (quit) or (action, settings) with action "serve" or "benchmark".
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, OptionList, SelectionList, Static
from textual.widgets.option_list import Option as ListOption

from ..errors import InvalidInputError
from ..paths import models_dir
from .config import BY_NAME, OPTIONS, save_config
from .discovery import ModelInfo, human_bytes, human_count, scan
from .gpus import GpuInfo, list_gpus

MiB = 1 << 20
GGUF_NOTE = ("CPU experts come from the GGUF {name} (its blocks read in place). With a GPU selected the GPU engine "
             "runs beside them: prefill and the hot-expert cache use experts built from the model at gpu_expert_bits.")
NO_GPU_NOTE = ("No CUDA GPU is visible on this machine. Krasis will run on the CPU path: every weight in system "
               "RAM, routed experts through the INT4/INT8 CPU kernels. Press Enter to continue.")
EDITABLE = [o for o in OPTIONS if o.name not in ("model_path", "models_dir", "gguf_path", "gpus")]
FREE_MARGIN_MB = 1024  # the engine's default budget is the GPU's free memory less this


def option_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class ModelScreen(Screen):
    BINDINGS = [Binding("q", "app.quit", "Quit")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("1/4  Choose a model (arrows, Enter)", classes="title")
        if self.app.problem:
            yield Static(Text(self.app.problem), id="problem", classes="error")
        yield DataTable(id="models", cursor_type="row")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("model", "architecture", "layers", "attention", "experts (routed/shared/top-k)",
                          "routing", "params", "RAM bf16", "RAM int8", "RAM int4", "notes")
        self.models = scan([self.app.config["models_dir"]])
        saved = self.app.config["model_path"]
        for i, m in enumerate(self.models):
            if m.error:
                table.add_row(m.name, m.architecture or "?", "", "", "", "", "", "", "", "", Text(m.error[:80]))
            else:
                ram = [human_bytes(m.ram_bytes[q]) for q in ("bf16", "int8", "int4")]
                experts = f"{m.routed_experts}/{m.shared_experts}/{m.top_k}" if m.routed_experts else "dense"
                notes = f"{len(m.gguf_files)} GGUF beside it" if m.gguf_files else ""
                table.add_row(m.name, m.architecture, str(m.layers), m.attention, experts, m.routing,
                              human_count(m.params), *ram, notes)
            if saved and str(m.path) == saved:
                table.move_cursor(row=i)
        status = self.query_one("#status", Static)
        if not self.models:
            folders = ", ".join(str(d) for d in (models_dir(), self.app.config["models_dir"]) if d)
            status.update(Text(f"No models found in {folders}. Put Hugging Face model folders (config.json, "
                               "*.safetensors, tokenizer.json) there, or start with --models-dir DIR."))
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        model = self.models[event.cursor_row]
        if model.error:
            self.query_one("#status", Static).update(Text(f"{model.name} cannot be used: {model.error}"))
            return
        self.app.model = model
        self.app.config["model_path"] = str(model.path)
        self.app.push_screen(SourceScreen())


class SourceScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def compose(self) -> ComposeResult:
        m: ModelInfo = self.app.model
        yield Header()
        yield Static(f"2/4  CPU experts for {m.name}: where they come from (Enter)", classes="title")
        ram = m.ram_bytes
        options = [ListOption(f"INT4, built from the model once (weight cache); about {human_bytes(ram['int4'])} "
                              "of RAM", id="int4"),
                   ListOption(f"INT8, built from the model once (weight cache); about {human_bytes(ram['int8'])} "
                              "of RAM", id="int8"),
                   ListOption(f"BF16, unquantised (no cache); about {human_bytes(ram['bf16'])} of RAM", id="bf16")]
        for i, path in enumerate(m.gguf_files):
            options.append(ListOption(f"GGUF {path.name} (found beside the model; {human_bytes(_size(path))}): "
                                      "llama.cpp blocks read in place by the CPU experts", id=f"gguf{i}"))
        yield OptionList(*options, id="sources")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        config, ggufs = self.app.config, [str(p) for p in self.app.model.gguf_files]
        sources = self.query_one(OptionList)
        if config["gguf_path"] in ggufs:
            sources.highlighted = 3 + ggufs.index(config["gguf_path"])
        else:
            sources.highlighted = {4: 0, 8: 1, 16: 2}.get(config["cpu_expert_bits"], 0)
        sources.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        choice = event.option.id
        if choice.startswith("gguf"):
            # the GGUF's own block types set the experts' format: cpu_expert_bits stays at 16 (nothing to quantise)
            self.app.config["gguf_path"] = str(self.app.model.gguf_files[int(choice.removeprefix("gguf"))])
            self.app.config["cpu_expert_bits"] = 16
        else:
            self.app.config["cpu_expert_bits"] = {"int4": 4, "int8": 8, "bf16": 16}[choice]
            self.app.config["gguf_path"] = ""
        self.app.push_screen(GpuScreen())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def gguf_conflict(config: dict) -> str | None:
    """Why the chosen GGUF cannot run with these settings (and what to change), or None."""
    if not config["gguf_path"]:
        return None
    name = Path(config["gguf_path"]).name
    if config["cpu_expert_bits"] != 16:
        return (f"CPU experts come from the GGUF {name}, whose own types set their format: set cpu_expert_bits to 16, "
                "or go back (Esc) and choose INT4 or INT8 built from the model")
    return None


class GpuScreen(Screen):
    BINDINGS = [Binding("enter", "confirm", "Confirm", priority=True), Binding("escape", "app.pop_screen", "Back")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("3/4  GPUs (Space selects or clears, Enter confirms)", classes="title")
        gpus: list[GpuInfo] = self.app.gpus
        gguf = self.app.config["gguf_path"]
        if gguf:
            yield Static(GGUF_NOTE.format(name=Path(gguf).name), id="gguf-note")
        if gpus:
            chosen = set(self.app.config["gpus"]) or {0}
            yield SelectionList[int](*[(f"GPU {g.index}: {g.name}, {g.free_mb:,} MiB free of {g.total_mb:,} MiB",
                                        g.index, g.index in chosen) for g in gpus], id="gpus")
        else:
            yield Static(NO_GPU_NOTE, id="no-gpu")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        if self.app.gpus:
            self.query_one(SelectionList).focus()

    def action_confirm(self) -> None:
        config = self.app.config
        selected = sorted(self.query_one(SelectionList).selected) if self.app.gpus else []
        config["gpus"] = selected
        config["device"] = "cuda" if selected else "cpu"
        config["num_gpus"] = max(1, len(selected))
        self.app.push_screen(ConfigScreen())


class ConfigScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self) -> None:
        super().__init__()
        self.invalid: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("4/4  Settings (empty = decided by the engine); then launch", classes="title")
        with Horizontal():
            with VerticalScroll(id="options"):
                for o in EDITABLE:
                    hint = "|".join(str(c) for c in o.choices) if o.choices else o.kind
                    with Horizontal(classes="row"):
                        yield Label(f"{o.name} ({hint})", classes="name")
                        yield Input(option_text(self.app.config[o.name]), id=f"opt-{o.name}", placeholder="auto")
                    yield Static("", id=f"err-{o.name}", classes="error")
            yield Static("", id="budget")
        with Horizontal(id="actions"):
            yield Button("Launch the server", id="serve", variant="primary")
            yield Button("Run the benchmark first", id="benchmark")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_budget()

    def on_input_changed(self, event: Input.Changed) -> None:
        name = event.input.id.removeprefix("opt-")
        error = self.query_one(f"#err-{name}", Static)
        try:
            self.app.config[name] = _parse(name, event.value)
        except ValueError as e:
            self.invalid[name] = str(e)
            event.input.add_class("invalid")
            error.update(Text(f"refused: {e}"))
            return
        self.invalid.pop(name, None)
        event.input.remove_class("invalid")
        error.update("")
        self.refresh_budget()

    def refresh_budget(self) -> None:
        self.query_one("#budget", Static).update(Text("\n".join(budget_lines(self.app.model, self.app.config,
                                                                             self.app.gpus))))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        status = self.query_one("#status", Static)
        if self.invalid:
            status.update(Text("Fix the refused values first: " + "; ".join(self.invalid.values())))
            return
        conflict = gguf_conflict(self.app.config)
        if conflict:
            status.update(Text(f"Cannot launch: {conflict}."))
            return
        path = save_config(self.app.config)
        self.app.saved_to = path
        self.app.exit((event.button.id, dict(self.app.config)))


def _parse(name: str, text: str):
    from .config import parse_text

    return parse_text(BY_NAME[name], text)


def budget_lines(model: ModelInfo | None, config: dict, gpus: list[GpuInfo]) -> list[str]:
    """The live VRAM breakdown and estimated maximum context for the chosen model and settings."""
    from .estimate import plan_for

    if model is None or model.spec is None:
        return ["No model chosen."]
    bits = config["cpu_expert_bits"]
    ram_key = {16: "bf16", 8: "int8", 4: "int4"}[bits]
    lines = [f"{model.name}: {model.layers} layers, context {model.max_context:,} tokens"]
    if config["gguf_path"]:
        from .estimate import routed_expert_params

        gguf = Path(config["gguf_path"])
        rest = model.ram_bytes["bf16"] - routed_expert_params(model.spec) * 2
        lines += [f"CPU experts: GGUF {gguf.name} ({human_bytes(_size(gguf))}), memory-mapped",
                  f"system RAM for weights (est.): {human_bytes(rest + _size(gguf))}", ""]
    else:
        lines += [f"system RAM for weights (est.): {human_bytes(model.ram_bytes[ram_key])}", ""]
    chosen = [g for g in gpus if g.index in config["gpus"]] if config["device"] == "cuda" else []
    budget_mb = config["vram_budget_mb"]
    if budget_mb is None and chosen:
        budget_mb = max(chosen[0].free_mb - FREE_MARGIN_MB, 0)
    if budget_mb is None:
        lines += ["No GPU selected: the CPU path runs everything from system RAM.",
                  "(Set vram_budget_mb to see the plan a GPU of that size would get.)", "",
                  f"Estimated maximum context: {model.max_context:,} tokens (the model's)"]
        return lines
    if bits == 16:
        lines.append("cpu_expert_bits 16 on a GPU keeps every weight in VRAM (no expert streaming); choose 4 or 8 "
                     "for the GPU engine.")
    try:
        plan = plan_for(model.spec, config, budget_mb)
    except InvalidInputError as e:
        return lines + [f"Does not fit: {e}"]
    m = lambda b: f"{b / MiB:>9,.0f} MiB"  # noqa: E731
    head = f"GPU {chosen[0].index} ({chosen[0].name})" if chosen else "planned GPU (none selected)"
    lines += [f"{head}: budget {m(plan.budget).strip()}",
              f"  resident weights      {m(plan.resident)}",
              f"  expert stream buffers {m(plan.stream_buffers)}  ({plan.layer_group_size} layer(s) x 2)",
              f"  KV cache              {m(plan.kv_bytes)}  ({plan.kv_tokens:,} tokens)",
              f"  prefill activations   {m(plan.activation_bytes)}  (chunks of {plan.chunk_tokens:,} tokens)",
              f"  hot-expert cache      {m(plan.hcs_bytes)}  ({plan.hcs_slots:,} experts)",
              f"  margin                {m(plan.margin)}"]
    for g in chosen[1:]:
        lines.append(f"GPU {g.index} ({g.name}): idle; multi-GPU runs arrive with issue 12")
    lines += ["", f"Estimated maximum context: {min(plan.kv_tokens, model.max_context):,} tokens"]
    return lines


class LauncherApp(App):
    TITLE = "Krasis"
    CSS = """
    .title { text-style: bold; padding: 0 1; }
    .error { color: $error; padding: 0 1; }
    #status { color: $warning; padding: 0 1; }
    #options { width: 3fr; }
    #budget { width: 2fr; padding: 0 1; border: round $primary; }
    .row { height: 3; }
    .name { width: 34; padding: 1 1; }
    Input.invalid { border: tall $error; }
    #actions { height: 3; }
    """

    def __init__(self, config: dict, gpus: list[GpuInfo] | None = None, problem: str | None = None):
        super().__init__()
        self.config = dict(config)
        self.gpus = list_gpus() if gpus is None else gpus
        self.problem = problem
        self.model: ModelInfo | None = None
        self.saved_to = None

    def on_mount(self) -> None:
        self.push_screen(ModelScreen())
