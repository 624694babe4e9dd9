"""The poetry tasks instruction tuning teaches, each phrased several ways, and the mixture
that draws one task per poem each epoch.

Tuned on one sentence, a model learns one format; tuned on many tasks, each phrased many
ways, it learns to read the instruction, and follows phrasings it never saw (FLAN, T0).
Every task here is built from the corpus itself, in the one format of data/instruct.py:

    task      instruction (one of its phrasings)      input                response
    poem      請用以下題目寫一首詩                     the title            the poem
    form      請用以下題目寫一首七言絕句               the title            the poem, of that form
    acrostic  請寫一首藏頭詩，每句的第一個字依次是     each clause's first  the poem
                                                       character (藏頭)
    continue  續寫下面的詩                             the first couplet    the rest of the poem
    title     請為這首詩擬一個題目                     the poem             the title

Each task has eight training phrasings and one held out: the held-out one never appears in
a training sample, so evaluate.py can measure whether the model follows an instruction it
has not seen. With three phrasings a task, a model learns the three sentences; with eight,
it has to find what they share (藏頭, 五言, 續, 題目...). `--tasks book` is the book's run: title -> poem, with its one sentence.

A clause (句) is the text between two punctuation marks (metrics.clauses); the corpus keeps a
couplet per line, so "the first couplet" is the poem's first line.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from data.corpus import Poem, pretrain_text
from data.errors import UserError
from data.forms import FORMS, acrostic_head, clauses, form_name, is_regular_form
from data.instruct import INSTRUCTION, EncodedSample, Sample, encode_sample, poem_sample, response_rows, sample_length
from data.tokenizer import Tokenizer


def _poem(poem: Poem, instruction: str) -> Sample | None:
    return Sample(instruction, poem.title, poem.body)


def _form(poem: Poem, instruction: str) -> Sample | None:
    form = form_name(poem.body)
    return Sample(instruction.format(form=form), poem.title, poem.body) if form else None


def _acrostic(poem: Poem, instruction: str) -> Sample | None:
    return Sample(instruction, acrostic_head(poem.body), poem.body) if is_regular_form(poem.body) else None


def _continue(poem: Poem, instruction: str) -> Sample | None:
    if len(poem.lines) < 2 or len(clauses(poem.lines[0])) != 2:
        return None
    return Sample(instruction, poem.lines[0], "\n".join(poem.lines[1:]))


def _title(poem: Poem, instruction: str) -> Sample | None:
    return Sample(instruction, poem.body, poem.title)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    phrasings: tuple[str, ...]  # used in training; the first is what sample.py asks with
    held_out: tuple[str, ...]  # never in a training sample: for evaluate.py only
    build: Callable[[Poem, str], Sample | None]  # (poem, instruction) -> its sample, None if the poem cannot serve

    def sample(self, poem: Poem, instruction: str) -> Sample | None:
        """The poem as this task's sample with this phrasing (None if the poem cannot serve)."""
        return self.build(poem, instruction)


TASKS = {task.name: task for task in (
    Task("poem", "title -> poem",
         (INSTRUCTION, "以下面的題目作一首詩", "請為這個題目寫詩", "就這個題目寫一首詩", "題目如下，請寫一首詩",
          "請以此為題作詩", "為下面的題目賦詩一首", "寫一首詩，題目是"),
         ("試以此題賦詩一首",), _poem),
    Task("form", "title + form (五言絕句, 七言絕句, 五言律詩, 七言律詩) -> a poem of that form",
         ("請用以下題目寫一首{form}", "以下面的題目作一首{form}", "請寫一首{form}，題目如下", "就這個題目寫一首{form}",
          "以此為題，作{form}一首", "題目如下，請寫成{form}", "為下面的題目寫{form}", "用{form}的體裁寫這個題目"),
         ("試以此題賦{form}一首",), _form),
    Task("acrostic", "藏頭詩: characters -> a poem whose clauses begin with them, in order",
         ("請寫一首藏頭詩，每句的第一個字依次是", "作一首藏頭詩，各句以下面的字開頭", "用下面的字寫一首藏頭詩",
          "寫藏頭詩，句首依次為下列各字", "以下列各字為句首，作一首詩", "每句開頭依次用下面的字，寫一首詩",
          "藏頭詩：各句第一字如下", "請將下面的字依次放在每句開頭"),
         ("把下列各字依次藏在詩句開頭，寫一首詩",), _acrostic),
    Task("continue", "續寫: the first couplet -> the rest of the poem",
         ("請接著寫完這首詩", "續寫下面的詩", "以下是一首詩的開頭，請寫完它", "這首詩的頭兩句如下，請續完",
          "接著下面兩句往下寫", "請把這首詩補完", "給出首聯，寫出全詩其餘各句", "續成全篇"),
         ("這首詩只寫了頭兩句，替它補完",), _continue),
    Task("title", "擬題: poem -> its title",
         ("請為這首詩擬一個題目", "給下面的詩起個題目", "這首詩的題目是什麼", "為此詩擬題", "請給這首詩取個題目",
          "讀詩，寫出它的題目", "這首詩該叫什麼題目", "擬一個詩題"),
         ("讀下面這首詩，為它取個詩題",), _title),
)}


def instructions(task: Task, held_out: bool = False) -> list[str]:
    """Every instruction text of a task's phrasings, with each form filled in for the form task."""
    texts = task.held_out if held_out else task.phrasings
    return [t.format(form=f) for t in texts for f in FORMS] if "{form}" in "".join(texts) else list(texts)


# finetune.py's --tasks: every task, the two that teach new skills (counting lines to a form,
# copying a head into line openings) drawn two and three times as often. Measured against
# `all` (each task as often) in the same steps: form control 6-30 points higher on every
# form, common acrostic heads followed in 65 % of answers instead of none (docs/results.md).
DEFAULT_TASKS = "poem,form:2,acrostic:3,continue,title"


def tuning_poems(splits: dict[str, list[Poem]], forms: str = "regular") -> tuple[list[Poem], list[Poem]]:
    """The finetune-train and finetune-val poems instruction tuning uses: with forms="regular"
    (finetune.py's default) those of regular form only (all clauses 5 or all 7 characters,
    paired: tuning teaches a format, and a consistent one is learned faster); "all", every one."""
    def keep(poem: Poem) -> bool:
        return forms == "all" or is_regular_form(poem.body)

    return [p for p in splits["finetune_train"] if keep(p)], [p for p in splits["finetune_val"] if keep(p)]


def finetune_val_poems(tokenizer: Tokenizer, splits: dict[str, list[Poem]], block_size: int,
                       unknown: Counter | None = None, rows: Callable = response_rows
                       ) -> list[tuple[Poem, tuple[list[int], list[int]]]]:
    """The finetune-val set every stage and evaluate.py report a loss on, one definition so
    their figures compare: each regular-form finetune-val poem (tuning_poems' default) as the
    book's task, title -> poem in its one sentence, as (inputs, response labels), beside its
    poem, whatever --tasks, --forms or --loss-on a run trains with. Poems whose sample does
    not fit block_size are left out (never truncated). `rows` lays the samples out in a
    format: data/instruct.response_rows, or for a chat model data/conversations.conversation_rows
    (the same request as a one-turn conversation, its stop <|end|>)."""
    val_poems = tuning_poems(splits)[1]
    laid_out = rows(tokenizer, [poem_sample(p) for p in val_poems], block_size, unknown)
    return [(poem, row) for poem, row in zip(val_poems, laid_out) if row is not None]


def finetune_val_rows(tokenizer: Tokenizer, splits: dict[str, list[Poem]], block_size: int,
                      unknown: Counter | None = None, rows: Callable = response_rows
                      ) -> list[tuple[list[int], list[int]]]:
    """finetune_val_poems' rows alone: what finetune.py and align.py evaluate."""
    return [row for _, row in finetune_val_poems(tokenizer, splits, block_size, unknown, rows)]


@dataclass(frozen=True)
class MixedTask:
    """A task as a run mixes it: how often it is drawn (relative to the others), and in which phrasings."""
    weight: float
    phrasings: tuple[str, ...]


def parse_tasks(text: str, flag: str = "--tasks") -> dict[str, MixedTask]:
    """--tasks: `all`, `book`, or a comma-separated list of task names, each optionally with
    a weight (`acrostic:3` is drawn three times as often as a task of weight 1).

    `all` is every task, weight 1; `book` is title -> poem with the book's one sentence
    only: the single-task run.
    """
    if text.strip() == "book":
        return {"poem": MixedTask(1.0, (INSTRUCTION,))}
    items = [item.strip() for item in text.split(",") if item.strip()]
    if items == ["all"]:
        items = list(TASKS)
    tasks = {}
    for item in items:
        name, _, weight = item.partition(":")
        name = name.strip()
        if name not in TASKS:
            raise UserError(f"{flag}: unknown task {name}; give all, book, or a comma-separated list of "
                            f"{', '.join(TASKS)}, each optionally with a weight (e.g. acrostic:3)")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise UserError(f"{flag}: the weight of {name} must be a positive number, got {weight!r}")
        tasks[name] = MixedTask(value, TASKS[name].phrasings)
    if not tasks:
        raise UserError(f"{flag}: no task given; give all, book, or a comma-separated list of {', '.join(TASKS)}")
    return tasks


def tokenizer_texts(poems: list[Poem]) -> list[str]:
    """The texts a tokenizer is fitted to: every poem as pretraining renders it, plus every
    phrasing of every task, held-out ones too (those are unseen as instructions, not as
    characters: a char tokenizer must still spell them without <unk>).

    The vocabulary covers the whole cleaned corpus, not just the training split, so a
    validation title never turns into <unk> merely because it was held out.
    """
    return [pretrain_text(poems)] + [text for task in TASKS.values() for held in (False, True)
                                     for text in instructions(task, held)]


class TaskMixture:
    """The training rows of each epoch: every poem once, as one of the tasks it can serve
    (by the tasks' weights), in one of that task's phrasings, both drawn at random from
    (seed, epoch) alone.

    A pure function of (seed, epoch), so a run resumed mid-epoch sees the same samples,
    and an epoch costs what a single-task epoch costs. A poem takes only tasks whose
    sample fits block_size with every phrasing (a sample is dropped, never truncated: see
    data/instruct.py); a poem that fits none is dropped. `extra` samples (--data records)
    join every epoch as they are.
    """

    def __init__(self, poems: list[Poem], tasks: dict[str, MixedTask], tokenizer: Tokenizer,
                 block_size: int, loss_on: str = "response", seed: int = 0, extra: list[Sample] = (),
                 unknown: Counter | None = None):
        self.tasks, self.tokenizer, self.loss_on, self.seed = tasks, tokenizer, loss_on, seed
        self.unknown = unknown
        # A sample's length follows from its parts' (data/instruct.py encodes each part on its own).
        longest = {name: max(len(tokenizer.encode(t.format(form=f))) for t in task.phrasings for f in FORMS)
                   for name, task in tasks.items()}
        self.items: list[tuple[Poem | Sample, list[str]]] = []  # (poem, the tasks it can take) or (sample, [])
        self.dropped = 0
        for poem in poems:
            fitting = []
            for name in tasks:
                sample = TASKS[name].sample(poem, tasks[name].phrasings[0])
                if sample is not None and sample_length(longest[name], len(tokenizer.encode(sample.input)),
                                                        len(tokenizer.encode(sample.response))) <= block_size:
                    fitting.append(name)
            if fitting:
                self.items.append((poem, fitting))
            else:
                self.dropped += 1
        self.dropped_extra = 0  # of those, --data records
        for sample in extra:
            if len(encode_sample(tokenizer, sample, loss_on).inputs) <= block_size:
                self.items.append((sample, []))
            else:
                self.dropped += 1
                self.dropped_extra += 1
        self._cached: tuple[int, list[EncodedSample]] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def draws(self, epoch: int) -> list[tuple[str, Sample]]:
        """Each item's (task, sample) in this epoch; a --data record's task is "data"."""
        rng = random.Random(f"task mixture {self.seed} {epoch}")  # str seeds hash the same in every process
        drawn = []
        for item, fitting in self.items:
            if not fitting:
                drawn.append(("data", item))
                continue
            name = fitting[0] if len(fitting) == 1 else \
                rng.choices(fitting, weights=[self.tasks[n].weight for n in fitting])[0]
            phrasings = self.tasks[name].phrasings
            instruction = phrasings[0] if len(phrasings) == 1 else rng.choice(phrasings)
            drawn.append((name, TASKS[name].sample(item, instruction)))
        return drawn

    def rows(self, epoch: int) -> list[EncodedSample]:
        """This epoch's encoded samples (the last epoch asked for is kept: a step asks many times)."""
        if self._cached is None or self._cached[0] != epoch:
            rows = [encode_sample(self.tokenizer, s, self.loss_on, self.unknown) for _, s in self.draws(epoch)]
            self._cached = (epoch, rows)
        return self._cached[1]


def task_instruction(task: str, form: str = "", held_out: bool = False, phrasing: int = 0) -> str:
    """The instruction asking `task` of a tuned model: its `phrasing`-th training (or held-out)
    phrasing, with the form filled in for the form task."""
    texts = TASKS[task].held_out if held_out else TASKS[task].phrasings
    return texts[phrasing % len(texts)].format(form=form)
