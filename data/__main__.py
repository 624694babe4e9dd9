"""`python -m data`: load, clean and split the corpus, fit a tokenizer, print what came out.

    python -m data --poems ../shared/corpus/quan-tang-shi --tokenizer cl100k_base
"""

from __future__ import annotations

import argparse
import sys

from data.corpus import CorpusError, SplitConfig, all_poems, load_corpus, pretrain_text
from data.tasks import tokenizer_texts
from data.tokenizer import TiktokenTokenizer, TokenizerError, build_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--poems", default=None, help="folder of poem JSON files (default: poems/, downloaded if empty)")
    parser.add_argument("--tokenizer", default="char", help="char, or a tiktoken encoding such as cl100k_base")
    parser.add_argument("--seed", type=int, default=SplitConfig.seed, help="seed of the split shuffle")
    args = parser.parse_args(argv)
    try:
        splits = load_corpus(args.poems, SplitConfig(seed=args.seed))
        tokenizer = build_tokenizer(args.tokenizer, tokenizer_texts(all_poems(splits)))
    except (CorpusError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    if isinstance(tokenizer, TiktokenTokenizer):
        print(
            f"tokenizer {tokenizer.name}: {tokenizer.base_vocab_size:,} ids in the encoding, "
            f"compacted to {tokenizer.vocab_size:,} (used by the corpus + 256 bytes + specials)"
        )
    else:
        print(f"tokenizer char: vocabulary of {tokenizer.vocab_size:,} (characters + 5 specials)")
    for name, poems in splits.items():
        text = pretrain_text(poems)
        n_tokens = len(tokenizer.encode(text)) if poems else 0
        print(f"  {name:15s} {len(poems):7,} poems {len(text):10,} characters {n_tokens:10,} tokens")


if __name__ == "__main__":
    main()
