"""What every course notebook shares: fast mode, paths, and the checkpoints it needs.

Notebooks import this first (`from course import ...`); it puts the repository on the
import path so `import model`, `import pretrain`, `from data import ...` work from here.

Fast mode: set COURSE_FAST=1 and every notebook shrinks its runs (tiny models, a few
steps) to finish in under a minute; CI runs them that way. The default settings are
the lesson itself, a few minutes each on a laptop CPU.

Checkpoints: notebooks use the ones the README's commands write at the repository root
(`ckpt.pt` from `python pretrain.py`, `ckpt_sft.pt` from `python finetune.py --init
ckpt.pt`) when they exist, and otherwise train short ones into notebooks/out/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FAST = os.environ.get("COURSE_FAST", "") not in ("", "0")
if FAST:
    # Tiny models gain nothing from a second thread, and lose a lot when another job
    # shares the cores (threads wait for each other at every op).
    import torch

    torch.set_num_threads(1)
OUT = REPO / "notebooks" / "out"  # short runs made by the notebooks (git-ignored)

# The plots' font. Matplotlib's own fonts have no Chinese characters: a label 春 would draw as
# an empty box. Noto Sans CJK SC (SIL Open Font License) has both scripts, the poems'
# traditional characters and the notes' simplified ones; the mplfonts package ships its file
# (requirements.txt), so the README's one install command brings it and nothing downloads.
CJK_FONT_FILE = "NotoSansCJKsc-Regular.otf"


def _use_cjk_font() -> bool:
    """Register the CJK font with matplotlib and make it the first sans-serif choice; False,
    with one printed note, when the font file is not installed."""
    try:
        import mplfonts
    except ImportError:
        mplfonts = None
    path = Path(mplfonts.__file__).parent / "fonts" / CJK_FONT_FILE if mplfonts else None
    if path is None or not path.is_file():
        print("注意：没有找到中文字体（pip install -r requirements.txt 会装上 mplfonts），图中的文字改用英文。")
        return False
    from matplotlib import font_manager, rcParams

    font_manager.fontManager.addfont(str(path))
    name = font_manager.FontProperties(fname=str(path)).get_name()
    rcParams["font.family"] = "sans-serif"
    rcParams["font.sans-serif"] = [name, *[f for f in rcParams["font.sans-serif"] if f != name]]
    rcParams["axes.unicode_minus"] = False  # the font's own minus sign: U+2212 is not in every CJK font
    return True


CJK = _use_cjk_font()


def zh(chinese: str, ascii_fallback: str) -> str:
    """A plot label: the Chinese one when the CJK font is there, else its ASCII stand-in (never boxes)."""
    return chinese if CJK else ascii_fallback

# A tiny model for fast mode: trains in seconds, learns nothing much, exercises every line.
FAST_MODEL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "96", "--batch-size", "8",
              "--no-compile", "--dtype", "float32", "--eval-iters", "2"]


def pick(default, fast):
    """The default setting, or the fast-mode one when COURSE_FAST=1."""
    return fast if FAST else default


def _shown(path: Path) -> str:
    """A path as the notebooks print it: relative to the working directory when possible."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive, on Windows
        return str(path)


def poems_dir(whole: bool = False) -> str:
    """The corpus folder, as the notebooks print it: data.corpus.local_corpus_dir ($POEMS_DIR,
    else ../shared/corpus/quan-tang-shi beside the repository, else poems/, downloaded on
    first use like the scripts do). In fast mode, unless the `whole` corpus is asked for
    (notebooks 01-03 study it), two of its files (2,000 poems, copied once into
    notebooks/out/fast_poems/): every run, evaluation and corpus load is then a thirtieth
    of the work, which is what a test of the notebook's code needs."""
    import shutil

    from data.corpus import local_corpus_dir

    if whole or not FAST:
        return _shown(local_corpus_dir())
    fast = OUT / "fast_poems"
    if not fast.is_dir():
        OUT.mkdir(parents=True, exist_ok=True)
        partial = OUT / f".fast_poems.tmp-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for name in ("poet.tang.1000.json", "poet.tang.40000.json"):  # many regular-form poems
            shutil.copy(local_corpus_dir() / name, partial / name)
        os.replace(partial, fast)  # whole or not at all: an interrupted copy is never read
    return _shown(fast)


# What each stage's checkpoint is, in the notebooks' words (the kinds of tanggpt/checkpoint.py).
_KIND_NAMES = {"pretrain": "预训练", "sft": "指令微调", "dpo": "偏好对齐", "rl": "强化学习"}
_announced: set[Path] = set()


def _announce(path: Path, command: str, made_here: bool) -> None:
    """Say once per notebook which checkpoint it uses: the stage that wrote it, its steps, and
    whether it is the README command's or this notebook's own short run."""
    if path in _announced:
        return
    _announced.add(path)
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    kind = _KIND_NAMES.get(ckpt.get("kind"), ckpt.get("kind"))
    steps = f"{ckpt['step']:,} 步" if isinstance(ckpt.get("step"), int) else "步数未记录"
    origin = ("笔记本自己训练的短版本（仓库根目录没有它；完整的由 `" + command + "` 训练）" if made_here
              else "由 `" + command + "` 训练")
    print(f"检查点 {path.name}：{kind}，{steps}，{origin}")


def _checkpoint(name: str, command: str, train) -> Path:
    """REPO/name when present (and not in fast mode), else notebooks/out/name, made by
    train(path) the first time (fast mode keeps its own file, *_fast.pt). `command` is the
    README's command that makes REPO/name; the first use prints one line saying which it is."""
    root = REPO / name
    if root.exists() and not FAST:
        _announce(root, command, made_here=False)
        return root
    out = OUT / (name.replace(".pt", "_fast.pt") if FAST else name)
    if not out.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        train(out)
    _announce(out, command, made_here=True)
    return out


def base_checkpoint() -> Path:
    """The pretrained checkpoint: ckpt.pt at the repository root (from `python pretrain.py`)
    when present (and not in fast mode), else a short pretraining run into notebooks/out/."""
    import pretrain

    flags = ["--max-iters", "40", "--eval-interval", "40", *FAST_MODEL] if FAST else \
            ["--max-iters", "250", "--eval-interval", "125", "--eval-iters", "10"]
    return _checkpoint("ckpt.pt", "python pretrain.py",
                       lambda out: pretrain.main(["--poems", poems_dir(), "--out", _shown(out), *flags]))


def _tune(name: str, extra: list[str], command: str) -> Path:
    """A finetune.py run from base_checkpoint(): REPO/name when present, else a short one into notebooks/out/."""
    import finetune

    flags = ["--max-iters", "30", "--batch-size", "16", "--no-compile", "--dtype", "float32",
             "--sample-tokens", "40", "--sample-titles", "春夜喜雨"] if FAST else ["--max-iters", "150"]
    return _checkpoint(name, command, lambda out: finetune.main(
        ["--init", _shown(base_checkpoint()), "--poems", poems_dir(), "--out", _shown(out), *flags, *extra]))


def tuned_checkpoint() -> Path:
    """The instruction-tuned checkpoint: ckpt_sft.pt at the repository root (from `python
    finetune.py --init ckpt.pt`, five tasks mixed) when present (and not in fast mode), else a
    short tuning run of base_checkpoint() into notebooks/out/."""
    return _tune("ckpt_sft.pt", [], "python finetune.py --init ckpt.pt")


def book_checkpoint() -> Path:
    """The book's single-task tuning, title -> poem in one sentence: ckpt_sft_book.pt (from
    `python finetune.py --init ckpt.pt --tasks book --out ckpt_sft_book.pt`), the baseline
    notebook 07 measures the task mixture against."""
    return _tune("ckpt_sft_book.pt", ["--tasks", "book"],
                 "python finetune.py --init ckpt.pt --tasks book --out ckpt_sft_book.pt")


def lora_checkpoint() -> Path:
    """Instruction tuning through rank-8 LoRA adapters on the frozen pretrained model:
    ckpt_sft_lora.pt (from `python finetune.py --init ckpt.pt --lora-rank 8 --out
    ckpt_sft_lora.pt`, the same run as ckpt_sft.pt but for the adapters), else a short one."""
    return _tune("ckpt_sft_lora.pt", ["--lora-rank", "8"],
                 "python finetune.py --init ckpt.pt --lora-rank 8 --out ckpt_sft_lora.pt")


def chat_checkpoint(loss_on: str = "assistant") -> Path:
    """A chat model, tuned on conversations: ckpt_chat.pt (from `python finetune.py --init ckpt.pt
    --format chat`, the loss on every assistant turn) or, with loss_on="last", ckpt_chat_last.pt
    (`... --loss-on last --out ckpt_chat_last.pt`, the loss on the last turn only)."""
    name = "ckpt_chat.pt" if loss_on == "assistant" else f"ckpt_chat_{loss_on}.pt"
    command = "python finetune.py --init ckpt.pt --format chat" + (
        "" if loss_on == "assistant" else f" --loss-on {loss_on} --out {name}")
    return _tune(name, ["--format", "chat", "--loss-on", loss_on], command)


def _align(name: str, default_flags: list[str], command: str) -> Path:
    """An align.py run from tuned_checkpoint(): REPO/name when present, else a short one into
    notebooks/out/. Fast mode's tiny model writes no poem worth judging, so its pairs are
    the titles' real poems over its answers (--preference real)."""
    import align

    flags = ["--preference", "real", "--prompts", "12", "--samples-per-prompt", "2", "--max-iters", "4",
             "--eval-interval", "2", "--batch-size", "4", "--no-compile", "--dtype", "float32", "--sample-tokens", "40",
             "--sample-titles", "春夜喜雨"] if FAST else default_flags
    return _checkpoint(name, command, lambda out: align.main(
        ["--init", _shown(tuned_checkpoint()), "--poems", poems_dir(), "--out", _shown(out), *flags]))


def aligned_checkpoint() -> Path:
    """The preference-tuned checkpoint: ckpt_dpo.pt (from `python align.py --init ckpt_sft.pt`)."""
    return _align("ckpt_dpo.pt", ["--prompts", "256"], "python align.py --init ckpt_sft.pt")


def rhyme_preference_checkpoint() -> Path:
    """DPO toward rhyme alone, the run that fails: ckpt_dpo_rhyme.pt (from `python align.py --init
    ckpt_sft.pt --preference rhyme --rhyme-weight 0 --lr 3e-5 --min-lr 3e-6 --out ckpt_dpo_rhyme.pt`)."""
    return _align("ckpt_dpo_rhyme.pt", ["--prompts", "256", "--preference", "rhyme", "--rhyme-weight", "0",
                                        "--lr", "3e-5", "--min-lr", "3e-6"],
                  "python align.py --init ckpt_sft.pt --preference rhyme --rhyme-weight 0 --lr 3e-5 --min-lr 3e-6 "
                  "--out ckpt_dpo_rhyme.pt")


def rl_checkpoint() -> Path:
    """The reinforcement-learning checkpoint: ckpt_rl.pt (from `python rl.py --init ckpt_dpo.pt`)
    when present (and not in fast mode), else a short rl.py run of aligned_checkpoint() into
    notebooks/out/ (fast mode: two steps of two prompts, four answers each)."""
    import rl

    flags = ["--max-iters", "2", "--eval-interval", "1", "--batch-size", "2", "--group-size", "4",
             "--max-new-tokens", "24", "--eval-prompts", "2", "--no-compile", "--dtype", "float32"] if FAST else ["--max-iters", "60", "--eval-interval", "20"]
    return _checkpoint("ckpt_rl.pt", "python rl.py --init ckpt_dpo.pt", lambda out: rl.main(
        ["--init", _shown(aligned_checkpoint()), "--poems", poems_dir(), "--out", _shown(out), *flags]))
