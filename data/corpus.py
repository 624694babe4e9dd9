"""The Tang poem corpus: load it, clean it, split it, render it as text.

Everything the model ever reads starts here. The pipeline is

    load_poems(dir)  ->  clean_poems(poems)  ->  split_poems(poems)  ->  pretrain_text(...)

Loading accepts any folder of chinese-poetry style JSON files: each file is a JSON
array of objects with a `title` string and a `paragraphs` list of strings (one
couplet or line each). Bad input raises CorpusError with one line naming the file
(and record) so a script can print it without a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data.errors import UserError, lone_surrogate

class CorpusError(UserError):
    """A problem with the poem files; the message is one line naming the file."""


@dataclass
class Poem:
    title: str
    lines: list[str]
    author: str = ""
    rhythmic: str = ""  # a ci (詞) record's tune name, which it carries instead of a title

    @property
    def body(self) -> str:
        return "\n".join(self.lines)


# -----------------------------------------------------------------------------
# Loading


def _json_sort_key(path: Path) -> tuple:
    # poet.tang.1000.json must come after poet.tang.0.json and before poet.tang.2000.json,
    # so compare the numbers in the name as numbers, not as text.
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))


def load_poems(poems_dir: str | Path, flag: str = "--poems") -> list[Poem]:
    """Read every *.json file in `poems_dir` (in natural name order) into Poems; errors name `flag`."""
    folder = Path(poems_dir)
    if not folder.exists():
        raise CorpusError(f"{flag} {folder}: folder does not exist")
    if not folder.is_dir():
        raise CorpusError(f"{flag} {folder}: not a folder")
    files = sorted(folder.glob("*.json"), key=_json_sort_key)
    if not files:
        raise CorpusError(f"{flag} {folder}: no .json files in this folder")
    poems: list[Poem] = []
    for path in files:
        poems.extend(_load_file(path))
    return poems


def _load_file(path: Path) -> list[Poem]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CorpusError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(records, list):
        raise CorpusError(f"{path}: expected a JSON list of poems, got {type(records).__name__}")
    poems = []
    for i, record in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: expected an object with 'title' and 'paragraphs', got {type(record).__name__}")
        paragraphs = record.get("paragraphs")
        if paragraphs is None:
            raise CorpusError(f"{where}: poem has no 'paragraphs'")
        if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
            raise CorpusError(f"{where}: 'paragraphs' must be a list of strings")
        title = record.get("title", "")
        if not isinstance(title, str):
            raise CorpusError(f"{where}: 'title' must be a string")
        author = record.get("author", "")
        rhythmic = record.get("rhythmic", "") if "title" not in record else ""
        poems.append(Poem(title=title, lines=list(paragraphs), author=author if isinstance(author, str) else "",
                          rhythmic=rhythmic if isinstance(rhythmic, str) else ""))
    return poems


# -----------------------------------------------------------------------------
# Cleaning
#
# The corpus is an edition with an editor's apparatus mixed into the text. Each quirk
# below is handled by one named rule, and every rule counts what it did. The guiding
# choice: the model should learn to write poems, not to write editors' notes, so
# apparatus is removed, and poems whose text cannot be written in Unicode (or has
# holes) are dropped rather than taught to the model.
#
#   editorial notes   （一作「…」）, （按：…）, 〖1〗…  -> removed (a tuned model trained
#                     with them writes fake notes into about one poem in seven)
#   emendations       [祈]連 -> 祈連: the bracket marks an editor's correction; keep
#                     the corrected character, drop the brackets
#   footnote marks    [一○] (numerals in brackets) -> removed
#   lost characters   □ -> drop the poem: there is nothing to learn from a hole, and
#                     we do not want the model to generate them
#   composed chars    {艹/尔} (not in Unicode) -> drop the poem, same reason
#   half characters   a JSON escape of half a UTF-16 pair ("\ud800", a lone surrogate) -> drop the
#                     poem: it is no character, and printing or saving it as UTF-8 would fail
#   empty body/title  -> drop: a poem needs both for the instruction format
#   ci (詞) records   chinese-poetry's ci files carry a tune name ('rhythmic') and no title ->
#                     dropped and counted under their own name: this course tunes on shi (詩)
#   editors' prose    the edition's prefaces and afterwords (前言, 後記, …) and any text
#                     with a clause over 15 characters (prose, not verse) -> drop
#   duplicate bodies  -> keep the first copy, so no poem lands in two splits
#   book-title marks  《…》 left after the notes are gone are real text -> kept

_NOTE = re.compile(r"（[^（）]*）|\([^()]*\)")  # innermost pair; applied until none is left
_BRACKETED_NOTE = re.compile(r"〖[^〖〗]*〗")
_FOOTNOTE_MARK = re.compile(r"\[[一二三四五六七八九十○〇零\d]+\]")
_EMENDATION = re.compile(r"\[([^\[\]]+)\]")
_PUNCT_RUN = re.compile(r"([，。？！；：、])[，。？！；：、]+")
_CLAUSE_SEP = re.compile(r"[，。？！；：、\n]")
_FRONT_MATTER_TITLES = {"前言", "後記", "后记", "自序", "序", "序言", "凡例", "引言", "說明", "跋"}
MAX_VERSE_CLAUSE = 15
_HAS_HAN = re.compile(r"[\u3400-\u9fff\U00020000-\U0003ffff]")


@dataclass
class CleaningReport:
    poems_in: int = 0
    poems_out: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> poems dropped
    edits: Counter = field(default_factory=Counter)  # rule -> occurrences changed
    edited_poems: Counter = field(default_factory=Counter)  # rule -> poems it touched

    def summary(self) -> str:
        drops = ", ".join(f"{n:,} {reason}" for reason, n in self.dropped.items() if n)
        edits = ", ".join(
            f"{rule} {self.edits[rule]:,}× in {self.edited_poems[rule]:,} poems" for rule in self.edits if self.edits[rule]
        )
        return (
            f"corpus: {self.poems_in:,} poems, {self.poems_out:,} kept after cleaning\n"
            f"  dropped: {drops or 'none'}\n"
            f"  edited:  {edits or 'none'}"
        )


def _remove_notes(text: str) -> tuple[str, int]:
    """Remove parenthesised and 〖〗 notes (nested ones too); return text and count."""
    count = 0
    while True:
        text, n1 = _NOTE.subn("", text)
        text, n2 = _BRACKETED_NOTE.subn("", text)
        if n1 + n2 == 0:
            break
        count += n1 + n2
    # An unbalanced bracket means a note whose other half was lost in the edition:
    # cut from a stray opener to the end of its line, or from a line's start to a stray closer.
    lines = []
    for line in text.split("\n"):
        for opener in "（(〖":
            if opener in line:
                line, count = line[: line.index(opener)], count + 1
        for closer in "）)〗":
            if closer in line:
                line, count = line[line.rindex(closer) + 1 :], count + 1
        lines.append(line)
    return "\n".join(lines), count


def _clean_text(text: str, report_edits: Counter) -> str:
    """Apply the text rules to a title or a body; count each rule's changes."""
    text, n = _remove_notes(text)
    report_edits["editorial notes removed"] += n
    text, n = _FOOTNOTE_MARK.subn("", text)
    report_edits["footnote marks removed"] += n
    text, n = _EMENDATION.subn(r"\1", text)
    report_edits["emendation brackets unwrapped"] += n
    # Removing a note can leave "形？。" behind; keep the first mark of such a run.
    text, n = _PUNCT_RUN.subn(r"\1", text)
    report_edits["doubled punctuation merged"] += n
    return text


def clean_poems(poems: list[Poem]) -> tuple[list[Poem], CleaningReport]:
    """Apply every cleaning rule; return the kept poems and a counted report."""
    report = CleaningReport(poems_in=len(poems))
    kept: list[Poem] = []
    seen_bodies: set[str] = set()
    for poem in poems:
        edits: Counter = Counter()
        title = " ".join(_clean_text(poem.title, edits).split())
        body = _clean_text("\n".join(poem.lines), edits)
        # A line that was only a note leaves punctuation or nothing behind: drop it.
        lines = [line.strip() for line in body.split("\n")]
        lines = [line for line in lines if _HAS_HAN.search(line)]
        body = "\n".join(lines)

        if poem.rhythmic and not poem.title:
            reason = "ci (詞) records with 'rhythmic' instead of 'title' (not supported)"
        elif not lines:
            reason = "empty body"
        elif not title:
            reason = "empty title"
        elif title in _FRONT_MATTER_TITLES or max(map(len, _CLAUSE_SEP.split(body))) > MAX_VERSE_CLAUSE:
            reason = "editors' prose"
        elif "{" in body + title or "}" in body + title:
            reason = "composed characters {…}"
        elif "□" in body + title:
            reason = "lost characters □"
        elif lone_surrogate(title + body) is not None:
            # a JSON escape of half a UTF-16 pair: not a character, and no UTF-8 file or terminal can hold it
            reason = "half characters (lone surrogates such as \\ud800)"
        elif body in seen_bodies:
            reason = "duplicate body"
        else:
            reason = None
        if reason:
            report.dropped[reason] += 1
            continue
        seen_bodies.add(body)
        for rule, n in edits.items():
            report.edits[rule] += n
            report.edited_poems[rule] += n > 0
        kept.append(Poem(title=title, lines=lines, author=poem.author))
    report.poems_out = len(kept)
    return kept, report


# -----------------------------------------------------------------------------
# Splits


@dataclass
class SplitConfig:
    pretrain: float = 0.5  # share of poems for pretraining
    finetune: float = 0.3  # share for instruction tuning; the rest is kept for a later alignment stage
    val_fraction: float = 0.05  # of each stage's share, held out for validation
    seed: int = 1337

    def __post_init__(self) -> None:
        if not (0 < self.pretrain and 0 < self.finetune and self.pretrain + self.finetune <= 1):
            raise ValueError(f"split shares must be positive and sum to at most 1, got {self.pretrain} + {self.finetune}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


SPLIT_NAMES = ("pretrain_train", "pretrain_val", "finetune_train", "finetune_val", "alignment")


def split_poems(poems: list[Poem], config: SplitConfig | None = None) -> dict[str, list[Poem]]:
    """Split by poem: a seeded shuffle cut into the five splits of SPLIT_NAMES.

    The same poems and seed always give the same splits. Because the cleaned corpus has
    no duplicate bodies, no body can appear in two splits.
    """
    config = config or SplitConfig()
    order = list(range(len(poems)))
    random.Random(config.seed).shuffle(order)
    shuffled = [poems[i] for i in order]
    n_pre = round(len(poems) * config.pretrain)
    n_ft = round(len(poems) * config.finetune)
    pretrain, finetune, alignment = shuffled[:n_pre], shuffled[n_pre : n_pre + n_ft], shuffled[n_pre + n_ft :]
    n_pre_val = max(1, round(len(pretrain) * config.val_fraction))
    n_ft_val = max(1, round(len(finetune) * config.val_fraction))
    return {
        "pretrain_train": pretrain[n_pre_val:],
        "pretrain_val": pretrain[:n_pre_val],
        "finetune_train": finetune[n_ft_val:],
        "finetune_val": finetune[:n_ft_val],
        "alignment": alignment,
    }


# -----------------------------------------------------------------------------
# Rendering as text


def render_poem(poem: Poem) -> str:
    """A poem as pretraining text: the title, a newline, then its lines."""
    return poem.title + "\n" + poem.body


def pretrain_text(poems: list[Poem]) -> str:
    """All poems as one text, separated by a blank line, as in the book.

    There is deliberately no end-of-text token here: a base model trained on this
    stream learns to run from one poem into the next and never to stop. Only the
    instruction samples (data/instruct.py: prompt + response + end-of-text) teach stopping.
    """
    return "\n\n".join(render_poem(p) for p in poems)


# -----------------------------------------------------------------------------
# All of the above, as the training scripts use it

DEFAULT_POEMS_DIR = Path(__file__).resolve().parent.parent / "poems"


def local_corpus_dir() -> Path:
    """The corpus folder the tests and notebooks read: $POEMS_DIR if set (a relative path is
    taken from the repository root), else ../shared/corpus/quan-tang-shi beside the
    repository when it is there (where this project's CI keeps a copy), else poems/
    (downloaded on first use, as the scripts do)."""
    repo = DEFAULT_POEMS_DIR.parent
    if os.environ.get("POEMS_DIR"):
        path = Path(os.environ["POEMS_DIR"])
        return path if path.is_absolute() else repo / path
    shared = repo.parent / "shared" / "corpus" / "quan-tang-shi"
    return shared if shared.is_dir() else DEFAULT_POEMS_DIR


def corpus_folder(poems_dir: str | Path | None = None, verbose: bool = True) -> Path:
    """The folder a --poems flag names (None: poems/), the Tang corpus downloaded into it
    first when it is the default poems/ folder and holds no JSON yet. A folder the user
    names is never filled behind their back: an empty one is an error, when it is loaded."""
    folder = Path(poems_dir) if poems_dir is not None else DEFAULT_POEMS_DIR
    if folder.resolve() == DEFAULT_POEMS_DIR and not any(DEFAULT_POEMS_DIR.glob("*.json")):
        from data.download import DownloadError, download_corpus

        if verbose:
            print(f"no poems in {DEFAULT_POEMS_DIR}: downloading the Tang corpus (58 files, 25 MB)")
        try:
            download_corpus(DEFAULT_POEMS_DIR)
        except DownloadError as e:
            raise CorpusError(str(e)) from None
    return folder


def corpus_fingerprint(poems_dir: str | Path, flag: str = "--poems") -> str:
    """A short hash of a corpus folder's JSON files, names and bytes: what a run read, so that
    a tool can tell a leftover result made from other poems from one it can reuse."""
    folder = Path(poems_dir)
    if not folder.is_dir():
        raise CorpusError(f"{flag} {folder}: not a folder")
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.json"), key=_json_sort_key):
        digest.update(path.name.encode("utf-8", "surrogateescape") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def load_corpus(
    poems_dir: str | Path | None = None, split_config: SplitConfig | None = None, verbose: bool = True
) -> dict[str, list[Poem]]:
    """Load, clean and split the corpus; print the cleaning summary when verbose.

    With no folder given (or the default poems/ folder) and no JSON there yet, the
    Tang corpus is downloaded into poems/ first (corpus_folder).
    """
    folder = corpus_folder(poems_dir, verbose)
    poems, report = clean_poems(load_poems(folder))
    if verbose:
        print(report.summary())
    if not poems:
        dropped = ", ".join(f"{n:,} {reason}" for reason, n in report.dropped.most_common())
        raise CorpusError(f"--poems {folder}: no poems left after cleaning (dropped: {dropped or 'none'})")
    return split_poems(poems, split_config)


def all_poems(splits: dict[str, list[Poem]]) -> list[Poem]:
    """Every cleaned poem, in split order (what the tokenizer's vocabulary is built from)."""
    return [poem for name in SPLIT_NAMES for poem in splits[name]]

