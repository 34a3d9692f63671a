"""Chat templates render exactly as transformers' apply_chat_template renders them."""

import pytest
from transformers import AutoTokenizer

from krasis.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Explain MoE — briefly, ünïcode ok?"}],
    [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "{\"temp\": 21}"}],
]

# A template exercising what real templates use: bos_token, tojson, loop controls, namespace, raise_exception
# guard, tools, and a kwarg.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('bad role') }}{% endif %}{% set ns.n = ns.n + 1 %}"
    "[{{ ns.n }}:{{ m['role'] }}]\n  {{ m['content'] | trim }}\n{% if loop.index > 8 %}{% break %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% if enable_thinking %}<think>{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("qwen3_moe_mixed")[1]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_chatml_template_matches_transformers(model_dir, messages, generation_prompt, thinking):
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    ref = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False, **kwargs)
    ours = Tokenizer(model_dir).apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
    assert ours == ref


def test_rich_template_with_tools_and_bos_matches_transformers(model_dir, tmp_path):
    import json
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(chat_template=RICH_TEMPLATE, bos_token="<|endoftext|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function",
              "function": {"name": "get_weather", "description": "Wetter für eine Stadt", "parameters": parameters}}]
    messages = CONVERSATIONS[1]
    ref = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    ours = Tokenizer(tmp_path).apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                    enable_thinking=True)
    assert ours == ref


def test_tokenized_chat_matches_transformers_ids(model_dir):
    ref = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        CONVERSATIONS[1], add_generation_prompt=True, tokenize=True, return_dict=False)
    ours = Tokenizer(model_dir).apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, tokenize=True)
    assert ours == list(ref)


def test_encode_decode_round_trips_unicode(model_dir):
    tok = Tokenizer(model_dir)
    text = "Mixture-of-Experts: ünïcode, 数字 and emoji 🚀"
    assert tok.decode(tok.encode(text)) == text


def test_model_without_chat_template_says_so(model_dir, tmp_path):
    import json
    import shutil

    from krasis.errors import InvalidInputError

    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(InvalidInputError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
