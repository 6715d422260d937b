"""Tokenizers: ``StreamDecoder`` (the engine's streamed text) on the byte tokenizer and on Hugging Face byte-level
BPE and SentencePiece-style (Metaspace) tokenizers."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from step3_jax.tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder

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
