"""Data: the poem corpus (corpus.py), tokenizers (tokenizer.py) and batch builders (batches.py)."""

from data.batches import random_windows
from data.corpus import (
    INSTRUCTION,
    SPLIT_NAMES,
    CleaningReport,
    CorpusError,
    Poem,
    SplitConfig,
    all_poems,
    clean_poems,
    instruction_prompt,
    load_corpus,
    load_poems,
    pretrain_text,
    render_poem,
    split_poems,
    tokenizer_texts,
)
from data.tokenizer import (
    EOT,
    INP,
    INS,
    RES,
    SPECIALS,
    UNK,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    tokenizer_from_dict,
)
