"""Tokenizer and chat template of a model directory: ``tokenizers`` for tokenizer.json and the chat template
from tokenizer_config.json (or chat_template.jinja) rendered with jinja2 the way transformers renders it."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import InvalidInputError, ModelLoadError


class _GenerationTag(Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (used by training-aware templates) as plain output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode, decode and apply the chat template of a Hugging Face model directory."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json; download the model's tokenizer files "
                                 "(tokenizer.json and tokenizer_config.json) into the same folder")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(f"{path} cannot be read ({e}); re-download it") from e
        config_path = model_dir / "tokenizer_config.json"
        self.config: dict = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special_tokens = {key: _token_text(self.config.get(key))
                               for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
        template = self.config.get("chat_template")
        jinja_file = model_dir / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        if isinstance(template, list):  # named templates: {"name": ..., "template": ...}
            template = {t["name"]: t["template"] for t in template}
        self._templates: dict[str, str] = template if isinstance(template, dict) else (
            {"default": template} if template else {})
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._env = env
        self._compiled: dict[str, jinja2.Template] = {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens["eos_token"]
        return self._tok.token_to_id(eos) if eos else None

    def special_token_ids(self) -> set[int]:
        """Ids of the added tokens marked special (what ``decode(skip_special_tokens=True)`` drops)."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    @property
    def chat_template_text(self) -> str:
        """All of the model's chat template sources joined (named templates too), "" without one."""
        return "\n".join(t for t in self._templates.values() if isinstance(t, str))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            tools: list[dict] | None = None, **kwargs) -> str | list[int]:
        """Render ``messages`` with the model's chat template (extra kwargs such as ``enable_thinking`` reach
        the template); with ``tokenize`` return token ids (no extra special tokens, as transformers does)."""
        if not self._templates:
            raise InvalidInputError("this model has no chat template (tokenizer_config.json has no chat_template); "
                                    "send a plain prompt instead of chat messages")
        name = "tool_use" if tools and "tool_use" in self._templates else "default"
        if name not in self._templates:
            name = next(iter(self._templates))
        if name not in self._compiled:
            self._compiled[name] = self._env.from_string(self._templates[name])
        text = self._compiled[name].render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                           **{k: v for k, v in self.special_tokens.items() if v is not None}, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text
