"""Corpus loading, cleaning, splitting and rendering; bad input gives one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import data.corpus as corpus
from data.corpus import (
    CorpusError,
    Poem,
    SplitConfig,
    clean_poems,
    load_corpus,
    load_poems,
    local_corpus_dir,
    pretrain_text,
    split_poems,
)
from tests.conftest import REPO_ROOT


def write_json(folder: Path, name: str, payload) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    return path


def poem(title: str, *lines: str) -> dict:
    return {"title": title, "paragraphs": list(lines), "author": "某"}


# -----------------------------------------------------------------------------
# Loading


def test_loads_the_whole_tang_corpus_in_file_order():
    """All 58 files load, in numeric order (poet.tang.1000 after poet.tang.0, not after 10000)."""
    poems = load_poems(local_corpus_dir())
    assert len(poems) == 57_607
    first = json.loads((local_corpus_dir() / "poet.tang.0.json").read_text(encoding="utf-8"))
    second = json.loads((local_corpus_dir() / "poet.tang.1000.json").read_text(encoding="utf-8"))
    assert poems[0].title == first[0]["title"]
    assert poems[len(first)].title == second[0]["title"]


def test_loads_any_folder_of_the_same_schema(tmp_path):
    write_json(tmp_path, "b.json", [poem("乙", "二句。")])
    write_json(tmp_path, "a.json", [poem("甲", "一句，", "再句。"), {"title": "丙", "paragraphs": []}])
    poems = load_poems(tmp_path)
    assert [p.title for p in poems] == ["甲", "丙", "乙"]
    assert poems[0].lines == ["一句，", "再句。"]
    assert poems[1].author == ""


# -----------------------------------------------------------------------------
# Bad input: one line naming the file (and the record)


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "no .json files"),
    ],
    ids=["missing folder", "empty folder"],
)
def test_bad_folders(tmp_path, setup, expected):
    folder = setup(tmp_path)
    with pytest.raises(CorpusError, match=expected) as err:
        load_poems(folder)
    assert str(folder) in str(err.value)


def test_not_json(tmp_path):
    (tmp_path / "broken.json").write_text('[{"title": "甲", "paragraphs": [', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"broken\.json: not valid JSON"):
        load_poems(tmp_path)


def test_not_utf8(tmp_path):
    (tmp_path / "gbk.json").write_bytes('[{"title": "甲"}]'.encode("gbk"))
    with pytest.raises(CorpusError, match=r"gbk\.json: not UTF-8"):
        load_poems(tmp_path)


@pytest.mark.parametrize(
    "payload, expected",
    [
        ({"title": "甲"}, r"shape\.json: expected a JSON list of poems, got dict"),
        ([poem("甲", "一。"), "just a string"], r"shape\.json: record 1: expected an object"),
        ([poem("甲", "一。"), poem("乙", "二。"), {"title": "丙"}], r"shape\.json: record 2: poem has no 'paragraphs'"),
        ([{"title": "丙", "paragraphs": None}], r"record 0: poem has no 'paragraphs'"),
        ([{"title": "丙", "paragraphs": "一句。"}], r"record 0: 'paragraphs' must be a list of strings"),
        ([{"title": "丙", "paragraphs": ["一句。", 3]}], r"record 0: 'paragraphs' must be a list of strings"),
        ([{"title": 7, "paragraphs": ["一句。"]}], r"record 0: 'title' must be a string"),
    ],
    ids=["not a list", "record not an object", "no paragraphs", "null paragraphs", "string paragraphs",
         "non-string line", "non-string title"],
)
def test_wrong_shape_names_file_and_record(tmp_path, payload, expected):
    write_json(tmp_path, "shape.json", payload)
    with pytest.raises(CorpusError, match=expected) as err:
        load_poems(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_command_line_prints_one_line_without_traceback(tmp_path):
    write_json(tmp_path, "shape.json", [poem("甲", "一。"), {"title": "乙"}])
    result = subprocess.run(
        [sys.executable, "-m", "tools.corpus", "--poems", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ") and "record 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_after_cleaning_is_an_error(tmp_path):
    write_json(tmp_path, "a.json", [poem("", "（按：只有注。）")])
    with pytest.raises(CorpusError, match="no poems left after cleaning"):
        load_corpus(tmp_path, verbose=False)


# -----------------------------------------------------------------------------
# The default folder is downloaded into; a named one never is


def test_default_folder_is_downloaded_when_empty(tmp_path, monkeypatch):
    import data.download

    calls = []

    def fake_download(dest):
        calls.append(Path(dest))
        write_json(Path(dest), "poet.tang.0.json", [poem("甲", "白日依山盡，黃河入海流。")])

    monkeypatch.setattr(corpus, "DEFAULT_POEMS_DIR", tmp_path / "poems")
    monkeypatch.setattr(data.download, "download_corpus", fake_download)
    (tmp_path / "poems").mkdir()
    splits = load_corpus(None, verbose=False)
    assert calls == [tmp_path / "poems"]
    assert sum(len(v) for v in splits.values()) == 1
    load_corpus(None, verbose=False)  # now there is JSON: no second download
    assert len(calls) == 1


def test_failed_download_tells_how_to_use_a_local_copy(tmp_path, monkeypatch):
    import data.download

    def offline(dest):
        raise data.download.DownloadError("could not download poet.tang.0.json (no route); point --poems at a copy")

    monkeypatch.setattr(corpus, "DEFAULT_POEMS_DIR", tmp_path)
    monkeypatch.setattr(data.download, "download_corpus", offline)
    with pytest.raises(CorpusError, match="--poems"):
        load_corpus(None, verbose=False)


def test_named_empty_folder_is_not_downloaded_into(tmp_path, monkeypatch):
    import data.download

    monkeypatch.setattr(data.download, "download_corpus", lambda dest: pytest.fail("must not download"))
    with pytest.raises(CorpusError, match="no .json files"):
        load_corpus(tmp_path, verbose=False)


# -----------------------------------------------------------------------------
# Cleaning rules, one by one, on hand-made poems


def clean_one(title: str, *lines: str) -> Poem:
    kept, report = clean_poems([Poem(title, list(lines))])
    assert len(kept) == 1, report.dropped
    return kept[0]


def test_editorial_notes_are_removed():
    p = clean_one("中秋月（句）", "寒清萬國土，冷浸（一作鬦）四維根。", "（以上《詩藪雜編》四）（〖1〗以上三題。）。")
    assert p.title == "中秋月"
    assert p.lines == ["寒清萬國土，冷浸四維根。"]


def test_nested_and_trailing_notes_leave_clean_punctuation():
    p = clean_one("山園", "切直平生盡，何爲勞是形？（按：《文獻通考》引（一作「書」）錄二句。）。")
    assert p.lines == ["切直平生盡，何爲勞是形？"]


def test_unbalanced_note_is_cut_to_the_end_of_its_line():
    p = clean_one("甲", "白日依山盡，（按：此下殘", "黃河入海流。")
    assert p.lines == ["白日依山盡，", "黃河入海流。"]


def test_emendations_are_unwrapped_and_footnote_marks_removed():
    p = clean_one("答韓丈[一]", "昨夜宿[祈]連，今朝過[酒泉]。")
    assert p.title == "答韓丈"
    assert p.lines == ["昨夜宿祈連，今朝過酒泉。"]


@pytest.mark.parametrize(
    "title, lines, reason",
    [
        ("甲", ["空山不見□，但聞人語響。"], "lost characters □"),
        ("甲", ["簪玉步河堤，妖韶援綠{𥫗/戢}。"], "composed characters {…}"),
        ("甲", ["（見《輿地紀勝》卷八十一）。"], "empty body"),
        ("", ["白日依山盡，黃河入海流。"], "empty title"),
        ("前言", ["唐詩體制繁複。"], "editors' prose"),
        ("甲", ["有三據敦煌殘卷補全唐詩的整理工作曾化過二十多年的心血。"], "editors' prose"),
    ],
)
def test_poems_that_cannot_be_taught_are_dropped_with_a_reason(title, lines, reason):
    kept, report = clean_poems([Poem(title, lines)])
    assert kept == []
    assert report.dropped == {reason: 1}


def test_duplicate_bodies_keep_the_first_copy():
    poems = [Poem("甲", ["床前明月光，疑是地上霜。"]), Poem("乙", ["床前明月光，疑是地上霜。"]), Poem("丙", ["舉頭望明月。"])]
    kept, report = clean_poems(poems)
    assert [p.title for p in kept] == ["甲", "丙"]
    assert report.dropped["duplicate body"] == 1


def test_report_counts_add_up_and_summary_names_each_rule():
    poems = [
        Poem("甲", ["冷浸（一作鬦）四維根，昨夜[祈]連。"]),
        Poem("乙", ["空山□人。"]),
        Poem("丙", ["空山無人（注）。"]),
    ]
    kept, report = clean_poems(poems)
    assert report.poems_in == 3 and report.poems_out == len(kept) == 2
    assert report.edits["editorial notes removed"] == 2
    assert report.edited_poems["editorial notes removed"] == 2
    assert report.edits["emendation brackets unwrapped"] == 1
    summary = report.summary()
    assert "1 lost characters □" in summary and "editorial notes removed 2× in 2 poems" in summary


@pytest.mark.slow
def test_real_corpus_is_clean(splits):
    """No apparatus survives cleaning, and counts reconcile with the input."""
    poems = [p for split in splits.values() for p in split]
    _, report = clean_poems(load_poems(local_corpus_dir()))
    assert report.poems_in == 57_607
    assert report.poems_in - sum(report.dropped.values()) == report.poems_out == len(poems)
    # each quirk the corpus README lists was met and handled
    for reason in ("empty body", "duplicate body", "lost characters □", "composed characters {…}"):
        assert report.dropped[reason] > 0, reason
    assert report.edits["editorial notes removed"] > 8_000
    assert report.edits["emendation brackets unwrapped"] > 800
    text = "".join(p.title + p.body for p in poems)
    for mark in "（）〖〗[]{}□":
        assert mark not in text, mark
    assert all(p.title and p.lines for p in poems)
    assert len({p.body for p in poems}) == len(poems)


# -----------------------------------------------------------------------------
# Splits


def test_splits_are_disjoint_complete_and_proportional(splits):
    bodies = {name: {p.body for p in poems} for name, poems in splits.items()}
    names = list(bodies)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not bodies[a] & bodies[b], (a, b)
    total = sum(len(v) for v in splits.values())
    pretrain = len(splits["pretrain_train"]) + len(splits["pretrain_val"])
    finetune = len(splits["finetune_train"]) + len(splits["finetune_val"])
    assert abs(pretrain / total - 0.5) < 0.001
    assert abs(finetune / total - 0.3) < 0.001
    assert abs(len(splits["alignment"]) / total - 0.2) < 0.001
    assert abs(len(splits["finetune_val"]) / finetune - 0.05) < 0.001


def test_splits_are_seeded_and_deterministic():
    poems = [Poem(f"題{i}", [f"句{i}。"]) for i in range(200)]
    first = split_poems(poems, SplitConfig(seed=1))
    again = split_poems(list(poems), SplitConfig(seed=1))
    other = split_poems(poems, SplitConfig(seed=2))
    titles = lambda s: {k: [p.title for p in v] for k, v in s.items()}  # noqa: E731
    assert titles(first) == titles(again)
    assert titles(first) != titles(other)


def test_split_ratios_are_configurable_and_validated():
    poems = [Poem(f"題{i}", [f"句{i}。"]) for i in range(1000)]
    s = split_poems(poems, SplitConfig(pretrain=0.7, finetune=0.3, val_fraction=0.1))
    assert len(s["alignment"]) == 0
    assert (len(s["pretrain_train"]), len(s["pretrain_val"])) == (630, 70)
    with pytest.raises(ValueError, match="sum to at most 1"):
        SplitConfig(pretrain=0.8, finetune=0.3)
    with pytest.raises(ValueError, match="val_fraction"):
        SplitConfig(val_fraction=0)


# -----------------------------------------------------------------------------
# Rendering


def test_pretrain_text_is_title_newline_lines_blank_line_between_poems():
    poems = [Poem("靜夜思", ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]), Poem("登鸛雀樓", ["白日依山盡。"])]
    assert pretrain_text(poems) == "靜夜思\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。\n\n登鸛雀樓\n白日依山盡。"


def test_pretraining_stream_never_contains_specials(splits):
    text = pretrain_text(splits["pretrain_train"])
    for special in ("<|endoftext|>", "<INS>", "<RES>", "<unk>"):
        assert special not in text

