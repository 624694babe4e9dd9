"""Download the Tang poem corpus, verified by sha256.

    python -m poems.download                 # into poems/
    python -m poems.download --dest DIR      # elsewhere; --base-url URL for a mirror

The download itself (pinned commit, sha256 per file, resumable .part files) is
data/download.py's; the training scripts call it on their own when poems/ is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.corpus import DEFAULT_POEMS_DIR
from data.download import download_corpus, verify_corpus
from tanggpt.cli import flag, run_cli


@dataclass
class DownloadConfig:
    dest: str = flag(str(DEFAULT_POEMS_DIR), "directory to put the JSON files in")
    base_url: str = flag("", "URL of the folder holding the files (default: $POEMS_BASE_URL, else the pinned "
                             "upstream commit)")


def main(argv: list[str] | None = None) -> None:
    run_cli(run, DownloadConfig, argv, __doc__.splitlines()[0])


def run(config: DownloadConfig, explicit: set[str]) -> None:
    missing = len(verify_corpus(config.dest))
    paths = download_corpus(config.dest, base_url=config.base_url or None)
    print(f"{config.dest}: {len(paths)} files verified by sha256 "
          f"({missing} downloaded, {len(paths) - missing} already present)")


if __name__ == "__main__":
    main()
