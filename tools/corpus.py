"""Load, clean and split the corpus, fit a tokenizer, and print what came out.

    python -m tools.corpus                                    # poems/ (downloaded if empty), char tokenizer
    python -m tools.corpus --poems ../shared/corpus/quan-tang-shi --tokenizer cl100k_base

The same pipeline every stage reads its data through (data/corpus.py, data/tokenizer.py):
the cleaning summary, the tokenizer's size, and each split's poems, characters and tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.corpus import SplitConfig, all_poems, load_corpus, pretrain_text
from data.tasks import tokenizer_texts
from data.tokenizer import TiktokenTokenizer, build_tokenizer
from tanggpt.cli import flag, run_cli


@dataclass
class CorpusConfig:
    poems: str = flag("", "folder of poem JSON files (default: poems/, downloaded there if empty)")
    tokenizer: str = flag("char", "char, or a tiktoken encoding such as cl100k_base")
    seed: int = flag(SplitConfig.seed, "seed of the split shuffle")


def main(argv: list[str] | None = None) -> None:
    run_cli(run, CorpusConfig, argv, __doc__.splitlines()[0])


def run(config: CorpusConfig, explicit: set[str]) -> None:
    splits = load_corpus(config.poems or None, SplitConfig(seed=config.seed))
    tokenizer = build_tokenizer(config.tokenizer, tokenizer_texts(all_poems(splits)))
    if isinstance(tokenizer, TiktokenTokenizer):
        print(f"tokenizer {tokenizer.name}: {tokenizer.base_vocab_size:,} ids in the encoding, "
              f"compacted to {tokenizer.vocab_size:,} (used by the corpus + 256 bytes + specials)")
    else:
        print(f"tokenizer char: vocabulary of {tokenizer.vocab_size:,} (characters + 5 specials)")
    for name, poems in splits.items():
        text = pretrain_text(poems)
        n_tokens = len(tokenizer.encode(text)) if poems else 0
        print(f"  {name:15s} {len(poems):7,} poems {len(text):10,} characters {n_tokens:10,} tokens")


if __name__ == "__main__":
    main()
