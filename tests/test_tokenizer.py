"""Tokenizers: ``StreamDecoder`` (the engine's streamed text) on the byte tokenizer and on Hugging Face byte-level
BPE and SentencePiece-style (Metaspace) tokenizers."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from step3_jax.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    encode_chat,
    encode_chat_for_training,
    load_tokenizer,
    render_chat,
)

TEXTS = [
    "hello world, the quick brown fox",
    "naïve café: 東京 and 🦊 foxes 🦊🦊 jump",
    "  leading spaces and\nnew lines\n\n end",
]


class _Counting:
    """A tokenizer wrapper that records how many tokens each decode call got."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.tok.decode(ids)


def _hf(tmp_path, kind: str) -> HFTokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=kind == "metaspace"))
    if kind == "byte-level":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-like: "▁" marks a word start, unknown characters fall back to <0xNN> byte tokens
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        alphabet = []
    specials = ["<unk>", "<s>", "</s>"] + ([f"<0x{b:02X}>" for b in range(256)] if kind == "metaspace" else [])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(["hello world the quick brown fox jumps over the lazy dog café"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    spec = json.loads((tmp_path / "tokenizer.json").read_text())  # byte tokens: ordinary vocabulary, not special
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return HFTokenizer(tmp_path / "tokenizer.json")


def _stream(tokenizer, ids):
    counting = _Counting(tokenizer)
    decoder = StreamDecoder(counting)
    pieces = [decoder.push(t) for t in ids[:-1]]
    last = decoder.push(ids[-1])
    pieces.append(last + decoder.finish())
    calls = len(counting.sizes)
    assert decoder.finish() == "" and len(counting.sizes) == calls  # finishing again decodes nothing
    assert decoder.text == tokenizer.decode(ids)
    return pieces, counting.sizes[:-1]  # (the finish call decodes everything once)


@pytest.mark.parametrize("kind", ["bytes", "byte-level", "metaspace"])
def test_stream_decoder_pieces_add_up_to_the_full_text_at_a_bounded_cost(kind, tmp_path):
    """Pushed one token at a time, the pieces add up to the full decode of the sequence; none holds half a
    character (a multi-byte character arrives whole, with its last token); every decode call but the final one
    sees a short window, however long the sequence."""
    tokenizer = ByteTokenizer() if kind == "bytes" else _hf(tmp_path, kind)
    for text in TEXTS:
        ids = tokenizer.encode(text * 8, add_bos=False)
        pieces, sizes = _stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids), (kind, text)
        if kind != "metaspace":  # (SentencePiece drops the first word's leading space in a full decode)
            assert tokenizer.decode(ids) == text * 8
        assert not any("\ufffd" in p for p in pieces), (kind, pieces)
        assert max(sizes) <= 10 < len(ids), (kind, max(sizes), len(ids))
    fox = tokenizer.encode("🦊", add_bos=False)
    pieces, _ = _stream(tokenizer, tokenizer.encode("a", add_bos=False) + fox)
    assert pieces[-1].endswith("🦊") and not any("🦊" in p or "\ufffd" in p for p in pieces[:-1]), pieces


# a ChatML-like template: special tokens written by the template, a role check, the generation prompt
CHAT_TEMPLATE = """{{ bos_token }}{% for m in messages %}
{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}
<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def test_chat_template_renders_and_encodes(tmp_path):
    """A checkpoint tokenizer's chat template (tokenizer_config.json, as a string or as named templates; or
    chat_template.jinja, which comes first): rendered as transformers renders it (trim_blocks / lstrip_blocks, the
    tokenizer's bos / eos strings, raise_exception), its special tokens encoded as their ids and no BOS added; a
    template error, bad messages and a tokenizer without a template give clear errors."""
    _hf(tmp_path, "byte-level")
    tc = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = load_tokenizer(tmp_path)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    text = "<s><|system|>be brief</s>\n<|user|>hello world</s>\n<|assistant|>"
    assert render_chat(tok.chat_template, chat, bos_token="<s>", eos_token="</s>") == text
    ids = encode_chat(tok, chat)
    assert ids == tok.encode(text, add_bos=False) and ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2
    assert render_chat(tok.chat_template, chat[1:], add_generation_prompt=False, bos_token="", eos_token="|") == (
        "<|user|>hello world|\n"
    )
    with pytest.raises(ValueError, match="chat template: unknown role tool"):
        encode_chat(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="chat messages must be a list of"):
        encode_chat(tok, "hello")
    with pytest.raises(ValueError, match="chat template: .*end of template"):
        render_chat("{% if x %}", chat)
    # named templates; a chat_template.jinja beside them wins
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(tc, chat_template=named)))
    assert load_tokenizer(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert tok.decode(encode_chat(load_tokenizer(tmp_path), chat)) == "Jbe brief"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(tc, chat_template=7)))
    with pytest.raises(ValueError, match="tokenizer_config.json: chat_template must be a string"):
        load_tokenizer(tmp_path)
    tok.bos_id = None  # a tokenizer without a BOS token: the template's bos_token renders as nothing
    assert tok.decode(encode_chat(tok, chat[1:])) == "<|user|>hello world\n<|assistant|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="has no chat template"):
        encode_chat(load_tokenizer(tmp_path), chat)
    with pytest.raises(ValueError, match=r"tokenizer \(byte-level\) has no chat template"):
        encode_chat(ByteTokenizer(), chat)


def test_byte_tokenizer_special_strings_are_tokens_only_in_chat_text():
    """``<s>`` / ``</s>`` in a user's text (HTML, say) stay bytes; in rendered chat text (what a template's
    ``{{ eos_token }}`` writes) they are the BOS / EOS ids. Text that is not valid Unicode is refused, not
    silently turned into invalid UTF-8."""
    tok = ByteTokenizer()
    text = "<s>old</s> price"
    assert tok.encode(text, add_bos=False) == [b + 3 for b in text.encode()]
    assert tok.decode(tok.encode(text)) == text
    old, price = [b + 3 for b in b"old"], [b + 3 for b in b" price"]
    assert tok.encode(text, add_bos=False, special=True) == [1, *old, 2, *price]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    # (as with a Hugging Face tokenizer, the strings count wherever they sit in the rendered text)
    assert encode_chat(tok, [{"role": "user", "content": "a</s>"}]) == [b + 3 for b in b"a"] + [2, 2]
    with pytest.raises(UnicodeEncodeError):
        tok.encode("a\ud800b")
    assert issubclass(UnicodeEncodeError, ValueError)  # (so the CLIs report it as a bad input)


def test_conversations_for_training_mark_exactly_the_assistant_turns(tmp_path):
    """``encode_chat_for_training``: the ids are the whole conversation's in the chat template (here equal to
    encoding the rendered text at once), flagged True on exactly the assistant turns' tokens with their end-of-turn
    token, so the model is trained to answer and stop; every assistant prefix is the prompt ``encode_chat`` gives at
    inference. Content-part lists and null content reach the template; a template that rewrites earlier turns
    and malformed messages are refused by name."""
    _hf(tmp_path, "byte-level")
    tc = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = load_tokenizer(tmp_path)
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the quick fox"},
        {"role": "user", "content": "the lazy dog"},
        {"role": "assistant", "content": "brown dog"},
    ]
    ids, flags = encode_chat_for_training(tok, chat)
    assert ids == encode_chat(tok, chat, add_generation_prompt=False) and len(flags) == len(ids)
    spans, run = [], []
    for i, f in zip(ids, flags, strict=True):  # the runs of trained tokens
        if f:
            run.append(i)
        elif run:
            spans, run = [*spans, run], []
    spans += [run] if run else []
    assert [tok.decode(s) for s in spans] == ["the quick fox", "brown dog"]
    assert all(s[-1] == tok.eos_id for s in spans)  # each answer ends with its end-of-turn token, trained too

    class NoOffsets:  # a tokenizer without character offsets: each turn's text is encoded on its own
        eos_id, chat_template, encode, decode, id_to_token = (
            tok.eos_id,
            tok.chat_template,
            tok.encode,
            tok.decode,
            tok.id_to_token,
        )

    ids2, flags2 = encode_chat_for_training(NoOffsets(), chat)
    assert tok.decode([i for i, f in zip(ids2, flags2, strict=True) if f]) == "the quick foxbrown dog"
    for k in (2, 4):  # the untrained prefix before each answer is the inference prompt
        start = [n for n in range(len(ids)) if flags[n] and not flags[n - 1]][k // 2 - 1]
        assert ids[:start] == encode_chat(tok, chat[:k])
    parts = "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% elif m['content'] %}" \
        "{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% else %}<call>{% endif %}|{% endfor %}"  # fmt: skip
    multi = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
             {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]  # fmt: skip
    assert render_chat(parts, multi) == "ab|<call>|"
    # SentencePiece-style "▁" only before the first word (Llama / Mistral tokenizer.json files): the ids are still
    # those of the whole text, so the answers are trained as the model will see them after the inference prompt
    (tmp_path / "sp").mkdir()
    sp = _hf(tmp_path / "sp", "metaspace")
    spec = json.loads((tmp_path / "sp" / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["prepend_scheme"] = "first"
    (tmp_path / "sp" / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "sp" / "tokenizer_config.json").write_text(json.dumps(tc))
    sp = load_tokenizer(tmp_path / "sp")
    ids, flags = encode_chat_for_training(sp, chat)
    assert ids == encode_chat(sp, chat, add_generation_prompt=False)
    answers = [sp.decode([i for i, f in zip(ids, flags, strict=True) if f and i != sp.eos_id])]
    assert answers[0].replace(" ", "") == "thequickfoxbrowndog"
    # a template that ends turns with another special token: trained up to it when generation_config.json lists it
    tok.chat_template = CHAT_TEMPLATE.replace("{{ eos_token }}", "<unk>")
    unk = tok.token_to_id("<unk>")
    answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "brown dog"}]
    ids, flags = encode_chat_for_training(tok, answer)
    assert tok.decode([i for i, f in zip(ids, flags, strict=True) if f]) == "brown dog\n"  # (no end token known)
    tok.extra_eos_ids = (unk,)
    ids, flags = encode_chat_for_training(tok, answer)
    assert [i for i, f in zip(ids, flags, strict=True) if f][-1] == unk and not flags[-1]  # (the newline after it)
    tok.chat_template = "{{ messages[-1]['content'] }}"  # only the last turn: earlier turns are rewritten
    with pytest.raises(ValueError, match="does not render message 1 as a continuation"):
        encode_chat_for_training(tok, chat)
    with pytest.raises(ValueError, match="chat message 1 is not a"):
        encode_chat_for_training(tok, [chat[0], {"content": "no role"}])
    with pytest.raises(ValueError, match="chat message 0: content must be a string, a list of content parts"):
        render_chat(parts, [{"role": "user", "content": 7}])


def test_tokenizer_files_are_read_as_transformers_reads_them(tmp_path):
    """Truncation and padding saved in tokenizer.json do not cut or pad encodings; ``add_bos_token: false`` and a
    ``bos_token`` set to null in tokenizer_config.json mean no BOS (config.json's id does not override them); the
    files are UTF-8 whatever the locale; ``{% generation %}`` blocks (training tools' templates) render their body."""
    tok = _hf(tmp_path, "byte-level")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<unk>"}  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    long = "the quick brown fox jumps over the lazy dog " * 3
    whole = tok.encode(long)  # (the tokenizer before truncation and padding were saved into its file; no BOS)
    assert len(whole) > 4
    loaded = load_tokenizer(tmp_path)
    assert loaded.bos_id == 1  # no tokenizer_config.json: config.json's ids
    assert loaded.encode(long) == [1, *whole] and loaded.encode("hello") == [1, *tok.encode("hello")]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}), "utf-8")
    qwen_like = load_tokenizer(tmp_path)
    assert qwen_like.bos_id is None and qwen_like.encode("hello") == tok.encode("hello")
    tc = {"bos_token": {"content": "<s>"}, "add_bos_token": False, "eos_token": "</s>", "x": "東京"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False), "utf-8")
    neox_like = load_tokenizer(tmp_path)
    assert neox_like.bos_id == tok.token_to_id("<s>")
    assert neox_like.encode("hello") == tok.encode("hello")
    template = "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    assert render_chat(template, [{"role": "user", "content": "hi"}]) == "[hi]"
    # generation_config.json's eos_token_id list (a chat model's end-of-turn token) ends generations too
    from infer.cli import stop_ids
    from step3_jax import get_preset

    eos = neox_like.eos_id
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 7, 9000]}))
    chat_like = load_tokenizer(tmp_path)
    assert chat_like.eos_ids == (eos, 7, 9000)
    assert stop_ids(chat_like, get_preset("test")) == (eos, 7)  # (within the test model's vocabulary of 263)
    assert stop_ids(ByteTokenizer(), get_preset("test")) == (2,)
