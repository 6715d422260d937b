"""Training data: text / JSONL files -> tokenised documents -> packed fixed-length sequences.

Documents are tokenised (BOS ... EOS), shuffled once with the seed, concatenated and cut into rows of
``seq_len + 1`` tokens. Each row carries ``segment_ids`` (which document a token belongs to, so attention
never crosses documents) and ``positions`` (restarting at 0 in each document). Targets are the next token
inside the same document; the first token of a new document is never a target of the previous one.

A document may also be a conversation (a ``.jsonl`` line ``{"messages": [{"role": ..., "content": ...}, ...]}``,
as chat finetuning sets are written): it is rendered in the tokenizer's chat template, and only the assistant's
turns are targets (``target_mask``), so the model learns to answer, not to write the prompts.

Every epoch visits the rows in a fresh permutation of ``(seed, epoch)``. The iterator's whole state is
``{"epoch", "index"}``: saved with a checkpoint, it resumes the exact same batch sequence. The packed
rows are held in memory (this loader is for small-scale research corpora, up to a few hundred million
tokens).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What the data pipeline needs of a tokenizer (the byte tokenizer and HF tokenizers both fit)."""

    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]: ...


# A document: a text, or a conversation (a list of {"role", "content"} messages).
Document = str | list[dict]


def embedded_corpus() -> list[str]:
    """A corpus that ships with Python itself: the ~80 topics of the language reference (about 0.5 MB of
    English), as used by ``help()``. Needs no download."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def read_utf8(path: str | Path, what: str = "file") -> str:
    """A text file's contents; a byte-order mark (as some editors write) is not text. ``FileNotFoundError`` or
    ``ValueError`` naming ``what`` and the path when it is missing, not a file, or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} {'is not a file' if p.exists() else 'does not exist'}")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_documents(
    paths: Sequence[str | Path], *, text_field: str = "text", messages_field: str = "messages"
) -> list[Document]:
    """Read documents: a ``.jsonl`` file gives one document per line, its ``text_field`` (a text) or its
    ``messages_field`` (a conversation, which must have an assistant turn); any other file is read as plain
    UTF-8 text, one document per file."""
    from step3_jax.tokenizer import check_messages

    if not paths:
        raise ValueError("no data files given")
    docs: list[Document] = []
    for p in map(Path, paths):
        if p.is_dir():
            raise ValueError(f"data path {p} is a folder: give its files (e.g. {p}/*.jsonl)")
        text = read_utf8(p, "data file")
        if p.suffix.lower() == ".jsonl":
            for n, line in enumerate(text.split("\n"), 1):  # (not splitlines: U+2028 may sit in a string)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from e
                if isinstance(record, dict) and isinstance(record.get(text_field), str):
                    docs.append(record[text_field])
                elif isinstance(record, dict) and isinstance(record.get(messages_field), list):
                    messages = record[messages_field]
                    try:
                        check_messages(messages)
                    except ValueError as e:
                        raise ValueError(f"{p}:{n}: {e}") from None
                    if not any(m["role"] == "assistant" for m in messages):
                        raise ValueError(f"{p}:{n}: the conversation has no assistant turn to train on")
                    docs.append(messages)
                else:
                    raise ValueError(
                        f"{p}:{n}: expected an object with a string field {text_field!r} (a text) or a list field "
                        f"{messages_field!r} (a conversation)"
                    )
        else:
            docs.append(text)
    docs = [d for d in docs if not isinstance(d, str) or d.strip()]
    if not docs:
        raise ValueError(f"the data files {[str(p) for p in paths]} contain no text")
    return docs


def split_documents(docs: Sequence[Document], fraction: float, *, seed: int = 0) -> tuple[list, list]:
    """(training documents, held-out documents): ``fraction`` of them (at least one), chosen by ``seed``, held
    out whole, so no held-out text is ever trained on. ``ValueError`` if either side would be empty."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    n_eval = max(1, round(fraction * len(docs)))
    if n_eval >= len(docs):
        raise ValueError(
            f"holding out {fraction:g} of {len(docs)} document(s) leaves none to train on: give more documents, or "
            f"held-out files of their own"
        )
    order = np.random.default_rng((seed, 1)).permutation(len(docs))
    held = set(order[:n_eval].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


@dataclasses.dataclass
class PackedDataset:
    """Packed rows: tokens, segment_ids, positions, each int32 ``[rows, seq_len + 1]``; ``target_mask`` (bool, same
    shape, or None for all True): whether a token is ever a target (False for the prompt side of conversations)."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    target_mask: np.ndarray | None = None

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def fingerprint(self) -> str:
        """A short hash of the rows (tokens, segments, positions, target mask): equal for the same packed data."""
        h = hashlib.sha256()
        for a in (self.tokens, self.segment_ids, self.positions, self.target_mask):
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes() + str(a.shape).encode())
        return h.hexdigest()[:16]

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs/targets for the given row indices. ``loss_mask`` is 0 where the target starts a new document or
        is not a target (``target_mask``)."""
        tok, seg, pos = self.tokens[rows], self.segment_ids[rows], self.positions[rows]
        mask = seg[:, 1:] == seg[:, :-1]
        if self.target_mask is not None:
            mask &= self.target_mask[rows][:, 1:]
        return {
            "input_ids": tok[:, :-1],
            "targets": tok[:, 1:],
            "segment_ids": seg[:, :-1],
            "positions": pos[:, :-1],
            "loss_mask": mask.astype(np.float32),
        }


def pack_documents(
    docs: Iterable[Document], tokenizer: Tokenizer, seq_len: int, *, seed: int = 0, vocab_size: int | None = None
) -> PackedDataset:
    """Tokenise, shuffle (by ``seed``) and pack documents into rows of ``seq_len + 1`` tokens.

    Texts get BOS ... EOS and are packed back to back (a long one runs on into the next rows). Conversations are
    rendered in the tokenizer's chat template (:func:`~step3_jax.tokenizer.encode_chat_for_training`: it writes
    its own special tokens; only assistant turns are targets) and are never split: each goes whole into a row,
    as many as fit, the rest of the row padded (not trained), so every answer is trained with its whole
    conversation before it. A conversation longer than a row is cut to one row (a warning counts them)."""
    from step3_jax.tokenizer import encode_chat_for_training

    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    token_docs, target_docs, chat = [], [], []
    for d in docs:
        if isinstance(d, str):
            ids = list(tokenizer.encode(d))
            if tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
            targets = np.ones(len(ids), bool)
        else:
            ids, flags = encode_chat_for_training(tokenizer, d)
            targets = np.asarray(flags, bool)
        token_docs.append(np.asarray(ids, np.int32))
        target_docs.append(targets)
        chat.append(not isinstance(d, str))
    if not token_docs:
        raise ValueError("no documents to pack")
    top = max(int(t.max()) for t in token_docs if len(t))
    if vocab_size is not None and top >= vocab_size:
        raise ValueError(f"token id {top} does not fit the model's vocab_size {vocab_size}")
    order = np.random.default_rng(seed).permutation(len(token_docs))
    row = seq_len + 1
    texts, chats = [i for i in order if not chat[i]], [i for i in order if chat[i]]
    pad = getattr(tokenizer, "pad_id", 0)
    parts = [
        # (texts that do not fill one row between them, beside conversations: kept whole too, not dropped)
        _pack_stream(texts, token_docs, target_docs, row)
        or (_pack_whole(texts, token_docs, target_docs, row, pad) if chats else None),
        _pack_whole(chats, token_docs, target_docs, row, pad),
    ]
    parts = [p for p in parts if p is not None]
    if not parts:
        n = sum(len(t) for t in token_docs)
        raise ValueError(f"the corpus has {n} tokens, fewer than one row of seq_len + 1 = {row}")
    tokens, segs, pos, targets = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    target_mask = None if targets.all() else targets
    if target_mask is not None and not target_mask[:, 1:].any():
        raise ValueError(f"no assistant token falls in the {len(tokens)} packed rows: nothing to train on")
    return PackedDataset(tokens, segs, pos.astype(np.int32), target_mask)


def _pack_stream(order: list[int], token_docs, target_docs, row: int):
    """Documents back to back, cut into rows (the remainder dropped); None if not one row."""
    if not order:
        return None
    tokens = np.concatenate([token_docs[i] for i in order])
    rows = len(tokens) // row
    if rows == 0:
        return None
    cut = rows * row
    targets = np.concatenate([target_docs[i] for i in order])[:cut].reshape(rows, row)
    segs = np.concatenate([np.full(len(token_docs[i]), j, np.int32) for j, i in enumerate(order)])
    pos = np.concatenate([np.arange(len(token_docs[i]), dtype=np.int32) for i in order])
    pos = pos[:cut].reshape(rows, row)
    # A row that starts inside a document keeps counting positions from the row start, so every row is a
    # self-contained set of documents (the first may be a suffix of a longer one).
    segs = segs[:cut].reshape(rows, row)
    pos = pos - np.where(segs == segs[:, :1], pos[:, :1], 0)
    return tokens[:cut].reshape(rows, row), segs, pos, targets


def _pack_whole(order: list[int], token_docs, target_docs, row: int, pad_id: int | None):
    """Documents kept whole, as many per row as fit in order, each row padded (segment -1, never a target)."""
    if not order:
        return None
    pad = 0 if pad_id is None else pad_id
    rows: list[tuple] = []
    fill: list[tuple] = []
    used = cut = 0

    def close():
        nonlocal fill, used
        if fill:
            t, s, p, m = (np.concatenate(x) for x in zip(*fill, strict=True))
            n = row - len(t)
            rows.append((np.pad(t, (0, n), constant_values=pad), np.pad(s, (0, n), constant_values=-1),
                         np.pad(p, (0, n)), np.pad(m, (0, n))))  # fmt: skip
        fill, used = [], 0

    for seg, i in enumerate(order):
        t, m = token_docs[i], target_docs[i]
        if len(t) > row:
            t, m, cut = t[:row], m[:row], cut + 1
        if used + len(t) > row:
            close()
        fill.append((t, np.full(len(t), seg, np.int32), np.arange(len(t), dtype=np.int32), m))
        used += len(t)
    close()
    if cut:
        log.warning(
            "%d of %d conversations are longer than a row of seq_len + 1 = %d tokens and were cut to it (their "
            "later turns are not trained): a longer seq_len keeps them whole", cut, len(order), row,
        )  # fmt: skip
    return tuple(np.stack(x) for x in zip(*rows, strict=True))


class BatchIterator:
    """Deterministic, resumable iterator over a :class:`PackedDataset` (rows reshuffled every epoch).

    ``shard_index / shard_count`` give each process of a multi-process run its slice of every batch.
    """

    def __init__(
        self,
        data: PackedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > len(data):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(data)} packed rows of the corpus")
        if batch_size % shard_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by {shard_count} processes")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.epoch, self.index = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.data))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._perm(self.epoch)[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        per = self.batch_size // self.shard_count
        rows = rows[self.shard_index * per : (self.shard_index + 1) * per]
        self.index += 1
        return self.data.batch(rows)

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
