"""Tokenizers. ``ByteTokenizer`` is the built-in default: UTF-8 bytes offset by three special ids."""

from __future__ import annotations


class ByteTokenizer:
    """pad = 0, bos = 1, eos = 2, byte b -> b + 3 (vocab 259). Needs a model with vocab_size >= 259."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.offset + 256)
        return data.decode("utf-8", errors="replace")
