"""Tokenizers. ``ByteTokenizer`` is the built-in default: UTF-8 bytes offset by three special ids.
``load_tokenizer(folder)`` reads a checkpoint's Hugging Face ``tokenizer.json`` when it has one, with its chat
template (``encode_chat``)."""

from __future__ import annotations

import bisect
import datetime
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class ByteTokenizer:
    """pad = 0, bos = 1, eos = 2, byte b -> b + 3 (vocab 259). Needs a model with vocab_size >= 259.

    The special tokens are written ``<pad>``, ``<s>`` and ``</s>`` (a chat template's ``bos_token`` /
    ``eos_token``): in rendered chat text (``special=True``, as :func:`encode_chat` encodes) they are their ids;
    in any other text they are plain bytes. They decode to nothing."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3
    vocab_size = 256 + offset
    chat_template: str | None = None  # (none built in; a checkpoint folder's chat_template.jinja, or set one)
    eos_ids = (eos_id,)  # every token that ends a generation
    SPECIAL_TOKENS = {"<pad>": pad_id, "<s>": bos_id, "</s>": eos_id}
    _SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

    def encode(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        ids = self.encode_with_offsets(text, special=True)[0] if special else self._bytes(text)
        return [self.bos_id, *ids] if add_bos else ids

    def _bytes(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]  # (strict: a lone surrogate is a UnicodeEncodeError)

    def encode_with_offsets(self, text: str, *, special: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` (no BOS) and the character each token starts at; ``special``: the special tokens'
        strings are their ids."""
        ids: list[int] = []
        offsets: list[int] = []
        pos = 0
        matches = list(self._SPECIAL.finditer(text)) if special else []
        for match in [*matches, None]:
            end = match.start() if match else len(text)
            for j in range(pos, end):
                data = self._bytes(text[j])
                ids += data
                offsets += [j] * len(data)
            if match:
                ids.append(self.SPECIAL_TOKENS[match.group()])
                offsets.append(match.start())
                pos = match.end()
        return ids, offsets

    def token_to_id(self, token: str) -> int | None:
        return self.SPECIAL_TOKENS.get(token)

    def id_to_token(self, i: int | None) -> str | None:
        """The special tokens' strings (the chat template's ``bos_token`` / ``eos_token``); None for bytes."""
        return {v: k for k, v in self.SPECIAL_TOKENS.items()}.get(i)

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.offset + 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (read with the ``tokenizers`` library), with ByteTokenizer's interface.

    ``bos_id`` / ``eos_id`` / ``pad_id`` come from ``tokenizer_config.json`` (``bos_token`` ...; one it sets to
    null stays None) when it names them, else from ``config.json`` (``bos_token_id`` ...); any may be None.
    :meth:`encode` puts ``bos_id`` first unless ``add_bos`` is False (``add_bos_token: false``).
    """

    def __init__(self, path: str | os.PathLike, *, bos_id=None, eos_id=None, pad_id=None):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception type on malformed JSON
            raise ValueError(f"{path}: not a valid Hugging Face tokenizer.json ({e})") from e
        # truncation / padding a tokenizer.json may carry apply only when asked for (as in transformers): never
        # here, where prompts and training documents are encoded whole
        self._tok.no_truncation()
        self._tok.no_padding()
        self.path = path
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = True  # tokenizer_config.json's add_bos_token, when it says
        self.chat_template: str | None = None  # Jinja source (tokenizer_config.json / chat_template.jinja)
        # more tokens that end a generation (generation_config.json's eos_token_id list: e.g. an end-of-turn token)
        self.extra_eos_ids: tuple[int, ...] = ()

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every token that ends a generation: ``eos_id`` and generation_config.json's ``eos_token_id`` (an id or a
        list of them, as chat models list their end-of-turn token there), each once."""
        return tuple(dict.fromkeys(i for i in (self.eos_id, *self.extra_eos_ids) if i is not None))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int | None) -> str | None:
        return None if i is None else self._tok.id_to_token(int(i))

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.add_bos and self.bos_id is not None else list(ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` (no BOS) and the character each token starts at."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [start for start, _ in enc.offsets]


class StreamDecoder:
    """Text of a growing token sequence, piece by piece, at a cost per token that does not grow with the sequence:
    each :meth:`push` decodes only a short window (the tokens since the last emitted piece, after the ones before
    them as context, so tokenizers whose text depends on the previous token, such as SentencePiece's leading
    spaces, decode as they would in full) and holds text back while it ends in an unfinished UTF-8 character.
    :meth:`finish` decodes the whole sequence once and returns what the pieces have not yet said, so the pieces
    add up to ``tokenizer.decode(tokens)``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0  # context window start
        self._read = 0  # tokens before this are emitted
        self._finished = -1  # len(tokens) at the last finish()

    def push(self, token: int) -> str:
        """Add a token; returns the new text it completes ("" while a character is unfinished)."""
        self.tokens.append(int(token))
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix : self._read])
        after = decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += piece
        return piece

    def finish(self) -> str:
        """The rest of the text (the full decode past what was emitted); the pieces then equal the full decode,
        unless the tokenizer's full decode disagrees with an emitted piece (then this is its text past the
        longest common prefix). Again with no token pushed since: "" (nothing decoded)."""
        if self._finished == len(self.tokens):
            return ""
        self._finished = len(self.tokens)
        full = self.tokenizer.decode(self.tokens)
        n = len(self.text) if full.startswith(self.text) else len(os.path.commonprefix([full, self.text]))
        piece, self.text = full[n:], full
        return piece


def check_messages(messages) -> None:
    """``ValueError`` unless ``messages`` is a list of ``{"role": str, "content": ...}`` dicts whose content is a
    string, a list of content parts (``{"type": "text", "text": ...}`` ..., as the template reads them) or None (an
    assistant turn of only ``tool_calls``); other keys pass through to the template."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError('chat messages must be a list of {"role": str, "content": str} dicts')
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f'chat message {i} is not a {{"role": str, "content": ...}} dict: {m!r:.80}')
        content = m.get("content")
        if not (content is None or isinstance(content, str) or _content_parts(content)):
            raise ValueError(
                f"chat message {i}: content must be a string, a list of content parts ({{'type': 'text', 'text': "
                f"...}} ...) or null, got {content!r:.80}"
            )


def _content_parts(content) -> bool:
    return isinstance(content, list) and all(isinstance(p, Mapping) and isinstance(p.get("type"), str) for p in content)


def render_chat(template: str, messages: Sequence[Mapping], *, add_generation_prompt: bool = True, **context) -> str:
    """Render a Hugging Face chat template (Jinja) as ``transformers`` does: in a sandbox, with ``trim_blocks`` and
    ``lstrip_blocks``, ``raise_exception``, ``strftime_now`` and a ``tojson`` that does not escape HTML.
    ``messages``: ``{"role": ..., "content": ...}`` dicts. A template error (or a template's own
    ``raise_exception``) raises ``ValueError`` with its message."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    check_messages(messages)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks the assistant's tokens for training tools): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", Generation]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **context
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from e
    except Exception as e:  # noqa: BLE001 - e.g. a template that adds a string to the messages' content-part list
        raise ValueError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e


def encode_chat(tokenizer, messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template (:func:`render_chat`, with its ``bos_token`` /
    ``eos_token`` strings), ending with the assistant's turn prompt. The template writes every special token
    itself, so no BOS is added (as ``transformers``' ``apply_chat_template`` does). ``ValueError`` if the tokenizer
    has no chat template (the byte-level one has none)."""
    template, specials = _chat_setup(tokenizer)
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt, **specials)
    return _encode_rendered(tokenizer, text)[0]


def _encode_rendered(tokenizer, text: str, starts: Sequence[int] = (0,)) -> tuple[list[int], list[int]]:
    """Token ids of rendered chat text and the character each token starts at. The special tokens' strings the
    template wrote are those tokens (a Hugging Face tokenizer always reads them so; the byte-level one only here).
    A tokenizer without character offsets encodes the text from each of ``starts`` to the next on its own."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_with_offsets(text, special=True)
    if hasattr(tokenizer, "encode_with_offsets"):
        return tokenizer.encode_with_offsets(text)
    ids: list[int] = []
    offsets: list[int] = []
    for a, b in zip(starts, [*starts[1:], len(text)], strict=True):
        piece = tokenizer.encode(text[a:b], add_bos=False)
        ids += piece
        offsets += [a] * len(piece)
    return ids, offsets


def _chat_setup(tokenizer) -> tuple[str, dict]:
    """The tokenizer's chat template and the special-token strings it is rendered with."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        where = getattr(tokenizer, "path", None)
        raise ValueError(
            f"the tokenizer ({'byte-level' if where is None else where.parent}) has no chat template "
            f"(tokenizer_config.json 'chat_template', or chat_template.jinja, beside tokenizer.json)"
        )
    specials = {}
    for name in ("bos", "eos"):  # (unset: undefined, which renders as "")
        i = getattr(tokenizer, f"{name}_id", None)
        token = None if i is None or not hasattr(tokenizer, "id_to_token") else tokenizer.id_to_token(i)
        if token is not None:
            specials[f"{name}_token"] = token
    return template, specials


def end_of_generation_ids(tokenizer) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's ``eos_ids`` if it has them, else its ``eos_id`` (if any)."""
    ids = getattr(tokenizer, "eos_ids", None)
    if ids is None:
        ids = (getattr(tokenizer, "eos_id", None),)
    return tuple(i for i in ids if i is not None)


def encode_chat_for_training(tokenizer, messages: Sequence[Mapping]) -> tuple[list[int], list[bool]]:
    """A whole conversation's token ids in the tokenizer's chat template, with a per-token flag: True for the
    tokens the model should learn to write (every ``assistant`` turn, up to and including its last end-of-generation
    token, ``eos_ids``), False for the rest (system and user turns, the assistant's turn prompt, tool results).
    No BOS is added: the template writes its own.

    The ids are those of the whole rendered text (``encode_chat(..., add_generation_prompt=False)``): the template
    is rendered turn by turn (each assistant turn's prompt with ``add_generation_prompt``) only to find where each
    turn's text begins, and a token belongs to the turn its first character is in (a tokenizer's character
    offsets). ``ValueError`` if the template rewrites earlier turns as the conversation grows (e.g. one that drops
    earlier reasoning): such a template cannot be split into turns this way."""
    template, specials = _chat_setup(tokenizer)
    check_messages(messages)
    eos = set(end_of_generation_ids(tokenizer))
    starts: list[int] = []  # where each turn's text begins, and whether it is an answer
    trained: list[bool] = []
    done = ""

    def extend(text: str, i: int, answer: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise ValueError(
                f"the chat template does not render message {i} as a continuation of the messages before it "
                f"(it rewrites earlier turns), so its assistant turns cannot be told apart for training"
            )
        if len(text) > len(done):
            starts.append(len(done))
            trained.append(answer)
        done = text

    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            extend(render_chat(template, messages[:i], add_generation_prompt=True, **specials), i, False)
        turn = render_chat(template, messages[: i + 1], add_generation_prompt=False, **specials)
        extend(turn, i, m["role"] == "assistant")
    ids, offsets = _encode_rendered(tokenizer, done, starts or [0])
    turn_of = [max(bisect.bisect_right(starts, o) - 1, 0) for o in offsets]
    flags = [trained[t] for t in turn_of]
    # an answer is trained up to its last end-of-generation token: what the template writes after it (a newline
    # before the next turn) is not the model's to write
    last_end = {}
    for n, (t, i) in enumerate(zip(turn_of, ids, strict=True)):
        if i in eos:
            last_end[t] = n
    for n, t in enumerate(turn_of):
        if t in last_end and n > last_end[t]:
            flags[n] = False
    return ids, flags


def _chat_template(folder: Path, tc: dict) -> str | None:
    """The chat template of a tokenizer folder: ``chat_template.jinja``, else tokenizer_config.json's
    ``chat_template`` (a string, or a list of ``{"name", "template"}`` of which the "default" one)."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    value = tc.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ValueError(
            f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list of named templates with "
            f"a 'default' one, got {type(value).__name__}"
        )
    return value


def _special_token_id(tok: HFTokenizer, value) -> int | None:
    """``"<s>"`` or ``{"content": "<s>", ...}`` (tokenizer_config.json) -> its id."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_tokenizer(path: str | os.PathLike | None = None) -> HFTokenizer | ByteTokenizer:
    """The tokenizer of a checkpoint folder: its ``tokenizer.json`` if it has one, else the built-in
    :class:`ByteTokenizer` (also for ``path=None``), either with the folder's chat template if it has one; an HF
    tokenizer also takes the end-of-generation ids of generation_config.json (``eos_ids``)."""
    if path is None:
        return ByteTokenizer()
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    file = folder / "tokenizer.json"
    tc_path = folder / "tokenizer_config.json"
    tc = _read_json_object(tc_path) if tc_path.is_file() else {}
    if not file.is_file():
        log.info("%s has no tokenizer.json; using the byte-level tokenizer", folder)
        byte = ByteTokenizer()
        template = _chat_template(folder, tc)
        if template is not None:
            byte.chat_template = template
        return byte
    tok = HFTokenizer(file)
    ids = {}
    for name in ("bos", "eos", "pad"):
        ids[name] = _special_token_id(tok, tc.get(f"{name}_token"))
    if isinstance(tc.get("add_bos_token"), bool):
        tok.add_bos = tc["add_bos_token"]
    tok.chat_template = _chat_template(folder, tc)
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        cfg = _read_json_object(cfg_path)
        text_config = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        for name in ("bos", "eos", "pad"):
            value = cfg.get(f"{name}_token_id", text_config.get(f"{name}_token_id"))
            if isinstance(value, list):
                value = value[0] if value else None
            # (a token tokenizer_config.json names, even as null, is its; config.json fills in the others)
            if ids.get(name) is None and f"{name}_token" not in tc and isinstance(value, int):
                ids[name] = value
    tok.bos_id, tok.eos_id, tok.pad_id = ids.get("bos"), ids.get("eos"), ids.get("pad")
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        value = _read_json_object(gen_path).get("eos_token_id")
        values = value if isinstance(value, list) else [value]
        tok.extra_eos_ids = tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0)
    return tok
