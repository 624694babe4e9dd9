"""Data: the poem corpus (corpus.py), tokenizers (tokenizer.py), pretraining batches
(batches.py), the instruction format with its samples and batches (instruct.py), the
poetry tasks instruction tuning mixes (tasks.py) and the chat template (chat.py)."""

from data.batches import random_windows
from data.chat import ChatError, check_conversation, encode_conversation, render, render_ids
from data.corpus import (
    SPLIT_NAMES,
    CleaningReport,
    CorpusError,
    Poem,
    SplitConfig,
    all_poems,
    clean_poems,
    load_corpus,
    load_poems,
    pretrain_text,
    render_poem,
    split_poems,
)
from data.instruct import (
    IGNORE,
    INSTRUCTION,
    EncodedSample,
    EpochBatches,
    Sample,
    encode_sample,
    encode_samples,
    poem_sample,
    prompt_ids,
    prompt_text,
    title_prompt_ids,
)
from data.tasks import TASKS, Task, TaskMixture, parse_tasks, task_instruction, tokenizer_texts
from data.tokenizer import (
    CHAT_MARKERS,
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
