"""Conversations built from the corpus: what the chat format is tuned on, every assistant turn a real text.

A conversation opens with a request of one of the tasks (data/tasks.py: title -> poem, a
form, an acrostic, a continuation, a title), asked as the user would type it: the
instruction, a line break, the input; or, one time in ten, with a request for a poem's
opening couplet on a title (先寫頭兩句), whose rest is asked next. The assistant answers
with the corpus's own text. Then zero to two follow-ups, each answered by the corpus too:

    follow-up            the user asks (one of its phrasings)    the assistant answers
    title_it             為這首詩擬一個題目                       the poem's real title, when no turn has named it
    form_of_it           這首詩是什麼體裁？                       its form: 五言絕句, 七言絕句, 五言律詩 or 七言律詩
    continue_it          接著寫完                                 the rest of the poem whose opening couplet came first
    same_title           同一個題目，再寫一首                     another poem of the corpus with that title
    same_title_form      同一個題目，再寫一首七言絕句             another poem with that title, of the form asked for
    same_title_acrostic  同一個題目，寫一首藏頭詩，... + heads     another poem with that title, its heads given
    next                 a request of any task, on another poem   that poem's answer

title_it, form_of_it and continue_it are about the answer before: the model must read back
up the conversation. The same_title kinds need a title the conversation has named, and
another poem of it in the split (about one poem in ten has one). `next` asks something
new: the model must answer the last request, not the first. Half the conversations open
with a system prompt, a persona (你是一位唐代詩人) or a rule the answers keep in a way a
program can check (你只寫五言詩: every poem the assistant writes has 5-character clauses);
a rule is given only to conversations whose poems keep it, so the rule is what the data
teaches. Every follow-up and system prompt has held-out phrasings, never trained on, as
the tasks have (evaluation asks with them).

The block is short (a 七言律詩 is 64 characters): follow-ups are added only while the
conversation still fits the model's block_size, and never cut (see data/instruct.py).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

from data.chat import encode_conversation, render_ids
from data.corpus import Poem
from data.errors import UserError
from data.forms import acrostic_head, clauses, form_name, is_regular_form
from data.instruct import EncodedSample, Sample, prompt_ids, response_rows
from data.tasks import TASKS, MixedTask
from data.tokenizer import Tokenizer

Message = dict[str, str]


def request_text(instruction: str, input: str) -> str:
    """A task's request as the user types it: the instruction, then its input on the next line."""
    return f"{instruction}\n{input}"


def request_messages(instruction: str, input: str, system: str = "") -> list[Message]:
    """One request of a task as a conversation to answer: the system prompt, if any, then the user's request."""
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": request_text(instruction, input)}]


def chat_prompt_ids(tokenizer: Tokenizer, instruction: str, input: str, system: str = "") -> list[int]:
    """The chat format's prompt for one request: what a chat model continues with its answer
    (data/instruct.prompt_ids is the instruction format's)."""
    return render_ids(tokenizer, request_messages(instruction, input, system), add_generation_prompt=True)


def prompt_in_format(tokenizer: Tokenizer, instruction: str, input: str, chat: bool) -> list[int]:
    """One request's prompt in a model's format: for a chat model (`chat`) a one-turn
    conversation (chat_prompt_ids), else the book's <INS>...<INP>...<RES> (data/instruct.prompt_ids)."""
    return chat_prompt_ids(tokenizer, instruction, input) if chat else prompt_ids(tokenizer, instruction, input)


def rows_in_format(chat: bool) -> Callable[..., list[tuple[list[int], list[int]] | None]]:
    """How samples become scored rows in a model's format: conversation_rows for a chat model,
    else data/instruct.response_rows (the same arguments, the same one-entry-per-sample result)."""
    return conversation_rows if chat else response_rows


def conversation_rows(tokenizer: Tokenizer, samples: list[Sample], block_size: int, unknown: Counter | None = None
                      ) -> list[tuple[list[int], list[int]] | None]:
    """data/instruct.response_rows for a chat model: each sample asked as a one-turn conversation
    (request_messages), its response the assistant's turn, as (inputs, the answer's labels:
    its text and <|end|>); None where it does not fit block_size. One entry per sample, in order."""
    rows = []
    for sample in samples:
        messages = request_messages(sample.instruction, sample.input) + \
            [{"role": "assistant", "content": sample.response}]
        inputs, _, response = encode_conversation(tokenizer, messages, "last", unknown)
        rows.append((inputs, response) if len(inputs) <= block_size else None)
    return rows


@dataclass(frozen=True)
class FollowUp:
    name: str
    description: str
    phrasings: tuple[str, ...]  # used in training
    held_out: tuple[str, ...]  # never in a training conversation


FOLLOW_UPS = {f.name: f for f in (
    FollowUp("title_it", "title the poem just written",
             ("為這首詩擬一個題目", "給它起個題目", "這首詩該叫什麼題目？", "替剛才這首詩取個題目"),
             ("請為此詩想個題目",)),
    FollowUp("form_of_it", "name the form of the poem just written",
             ("這首詩是什麼體裁？", "它屬於何種詩體？", "說說這首詩的體裁", "這首詩是絕句還是律詩，五言還是七言？"),
             ("此詩算是何體？",)),
    FollowUp("same_title", "another poem on the same title",
             ("同一個題目，再寫一首", "用同樣的題目再作一首", "這個題目再來一首", "同題再寫一首"),
             ("就這個題目另寫一首",)),
    FollowUp("same_title_form", "a poem of the form asked for, on the same title",
             ("同一個題目，再寫一首{form}", "用同樣的題目寫一首{form}", "這個題目換成{form}再寫一首", "同題作一首{form}"),
             ("就這個題目另作{form}一首",)),
    FollowUp("same_title_acrostic", "an acrostic on the same title, its heads on the next line",
             ("同一個題目，寫一首藏頭詩，各句開頭依次是", "用同樣的題目作藏頭詩，句首為", "同題寫一首藏頭詩，每句第一字依次是",
              "這個題目再寫一首藏頭詩，句首用"),
             ("就這個題目另作藏頭詩，句首依次為",)),
    FollowUp("continue_it", "the rest of the poem whose opening couplet the conversation opened with",
             ("接著寫完", "請把它續完", "往下寫完這首詩", "後面幾句也寫出來"),
             ("把這首詩寫完",)),
    FollowUp("next", "a new request, of any task, on another poem", (), ()),
)}

# A conversation may open by asking for a poem's opening couplet on a title (then continue_it
# asks for the rest): a poem written in two turns, the second continuing the first.
OPENING = FollowUp("opening", "the opening couplet of a poem on a title, the title on the next line",
                   ("請用以下題目寫一首詩，先寫頭兩句", "以下面的題目作詩，先寫首聯", "就這個題目，先寫開頭兩句",
                    "先寫這個題目的首聯"),
                   ("以此為題，先給出頭兩句",))


@dataclass(frozen=True)
class SystemPrompt:
    name: str
    phrasings: tuple[str, ...]
    held_out: tuple[str, ...]
    keeps: Callable[[str], bool]  # does a poem the assistant wrote keep this rule


def _clauses_of(length: int) -> Callable[[str], bool]:
    return lambda poem: bool(clauses(poem)) and all(len(c) == length for c in clauses(poem))


SYSTEM_PROMPTS = {s.name: s for s in (
    SystemPrompt("poet", ("你是一位唐代詩人", "你是詩人，用詩回答", "你是一位擅長近體詩的詩人", "你是唐朝的詩人，請按要求作詩"),
                 ("你是一個會寫古詩的助手",), lambda poem: True),
    SystemPrompt("five", ("你只寫五言詩", "你寫的詩每句都是五個字", "只用五言作詩", "無論寫什麼，都寫五言"),
                 ("請一律寫五言",), _clauses_of(5)),
    SystemPrompt("seven", ("你只寫七言詩", "你寫的詩每句都是七個字", "只用七言作詩", "無論寫什麼，都寫七言"),
                 ("請一律寫七言",), _clauses_of(7)),
)}


@dataclass
class Turn:
    """One exchange: the user's text, the assistant's answer, and the poem the assistant has
    written that the conversation is now about (what a system prompt's rule checks, and what
    "this poem" means to the next follow-up), if any."""
    user: str
    assistant: str
    poem: str | None
    title_known: bool  # the conversation has named the title of the poem it is now about
    opening: bool = False  # the answer is a poem's opening couplet: its rest is asked next


def _task_turn(task: str, poem: Poem, instruction: str) -> Turn | None:
    sample = TASKS[task].sample(poem, instruction)
    if sample is None:
        return None
    written = {"poem": sample.response, "form": sample.response, "acrostic": sample.response,
               "continue": f"{sample.input}\n{sample.response}", "title": None}[task]
    # The title is named by a poem or form request (it is the input) and by a title request's answer.
    return Turn(request_text(sample.instruction, sample.input), sample.response, written,
                task in ("poem", "form", "title"))


def exchange(turn: Turn) -> list[Message]:
    """A turn as the user's message and the assistant's."""
    return [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]


OPENING_SHARE = 0.1  # of the conversations that open with a poem's opening couplet, where it fits


class ConversationMaker:
    """Conversations on the poems of one split: each a pure function of the random generator
    it is given, so a mixture seeded by (seed, epoch) draws the same ones on resume."""

    def __init__(self, poems: list[Poem], tasks: dict[str, MixedTask], held_out: bool = False):
        self.poems, self.tasks, self.held_out = poems, tasks, held_out
        self.by_title: dict[str, list[Poem]] = defaultdict(list)
        for poem in poems:
            self.by_title[poem.title].append(poem)

    def _phrasing(self, rng: random.Random, training: tuple[str, ...], held_out: tuple[str, ...]) -> str:
        texts = held_out if self.held_out else training
        return texts[0] if len(texts) == 1 else rng.choice(texts)

    def task_turn(self, rng: random.Random, poem: Poem, fits: Callable[[Turn], bool] = lambda turn: True,
                  names: list[str] | None = None) -> Turn | None:
        """A request of one of the tasks `names` (default: all the mixture's; drawn by its
        weights) on `poem`, and its real answer; a task whose turn does not fit is drawn
        again among the rest; None if the poem can serve none of them."""
        names = list(names if names is not None else self.tasks)
        while names:
            name = names[0] if len(names) == 1 else rng.choices(names, weights=[self.tasks[n].weight for n in names])[0]
            instruction = self._phrasing(rng, self.tasks[name].phrasings, TASKS[name].held_out)
            form = form_name(poem.body) or ""
            if "{form}" in instruction and not form:
                names.remove(name)
                continue
            turn = _task_turn(name, poem, instruction.format(form=form))
            if turn is not None and fits(turn):
                return turn
            names.remove(name)
        return None

    def follow_up(self, rng: random.Random, poem: Poem, before: Turn) -> tuple[Turn, Poem] | None:
        """A follow-up to `before` (an answer on `poem`), drawn among those that apply; the poem
        the conversation is now about."""
        choices = ["next"]
        if before.poem is not None and not before.title_known:
            choices.append("title_it")
        if before.poem is not None and form_name(before.poem):
            choices.append("form_of_it")
        # "The same title" only once the conversation has named it: the model cannot guess it.
        others = [p for p in self.by_title.get(poem.title, ()) if p.body != poem.body] if before.title_known else []
        if others:
            choices.append("same_title")
        if any(form_name(p.body) for p in others):
            choices.append("same_title_form")
        if any(is_regular_form(p.body) for p in others):
            choices.append("same_title_acrostic")
        if before.opening:  # the rest of the poem, always asked after its opening couplet
            choices = ["continue_it"]
        kind = rng.choice(choices)
        if kind == "next":
            other = self.poems[rng.randrange(len(self.poems))]
            turn = self.task_turn(rng, other)
            return (turn, other) if turn is not None else None
        follow = FOLLOW_UPS[kind]
        text = self._phrasing(rng, follow.phrasings, follow.held_out)
        if kind == "title_it":
            return Turn(text, poem.title, before.poem, True), poem
        if kind == "form_of_it":
            return Turn(text, form_name(before.poem), before.poem, before.title_known), poem
        if kind == "continue_it":
            return Turn(text, "\n".join(poem.lines[1:]), poem.body, True), poem
        if kind == "same_title_form":
            others = [p for p in others if form_name(p.body)]
        if kind == "same_title_acrostic":
            others = [p for p in others if is_regular_form(p.body)]
        other = others[rng.randrange(len(others))]
        if kind == "same_title_form":
            text = text.format(form=form_name(other.body))
        if kind == "same_title_acrostic":
            text = request_text(text, acrostic_head(other.body))
        return Turn(text, other.body, other.body, True), other

    def opening_turn(self, rng: random.Random, poem: Poem) -> Turn | None:
        """The opening couplet of `poem` asked for on its title (None for a poem of one line)."""
        if len(poem.lines) < 2 or len(clauses(poem.lines[0])) != 2:
            return None
        text = request_text(self._phrasing(rng, OPENING.phrasings, OPENING.held_out), poem.title)
        return Turn(text, poem.lines[0], None, True, opening=True)

    def conversation(self, rng: random.Random, poem: Poem, fits: Callable[[list[Message]], bool],
                     first_tasks: list[str] | None = None, max_follow_ups: int = 2) -> list[Message] | None:
        """A conversation opening with a request on `poem` (of one of `first_tasks`, default
        any), with up to max_follow_ups follow-ups and, half the time, a system prompt, each
        added only while `fits` holds; None if even the first exchange does not fit."""
        first = None
        if rng.random() < OPENING_SHARE:  # the opening couplet, then the rest: a poem in two turns
            first = self.opening_turn(rng, poem)
            if first is not None:  # kept only if the rest fits after it, asked in the longest way
                rest = Turn(max(FOLLOW_UPS["continue_it"].phrasings, key=len), "\n".join(poem.lines[1:]), None, True)
                first = first if fits(exchange(first) + exchange(rest)) else None
        first = first or self.task_turn(rng, poem, lambda turn: fits(exchange(turn)), first_tasks)
        if first is None:
            return None
        messages = exchange(first)
        turns, about = [first], poem
        follow_ups = rng.choices(range(max_follow_ups + 1), weights=[1, 2, 1][: max_follow_ups + 1])[0]
        for _ in range(max(follow_ups, 1) if first.opening else follow_ups):
            drawn = self.follow_up(rng, about, turns[-1])
            if drawn is None:
                break
            turn, about = drawn
            longer = messages + exchange(turn)
            if not fits(longer):
                break
            messages, turns = longer, turns + [turn]
        if rng.random() < 0.5:
            poems = [t.poem for t in turns if t.poem is not None]
            rules = [s for s in SYSTEM_PROMPTS.values() if all(s.keeps(p) for p in poems)]
            rule = rules[0] if len(rules) == 1 else rng.choice(rules)
            system = [{"role": "system", "content": self._phrasing(rng, rule.phrasings, rule.held_out)}]
            if fits(system + messages):
                messages = system + messages
        return messages


class ConversationMixture:
    """The chat format's training rows of each epoch: one conversation opening on each poem,
    drawn from (seed, epoch) alone, as TaskMixture draws the instruction format's samples, so
    a resumed run sees the same conversations, as many every epoch. A poem opens with one of
    the tasks whose first exchange fits block_size in its longest phrasing, as in TaskMixture;
    a poem no task can open is dropped. `loss_on` is data/chat.py's: every assistant turn, or
    the last."""

    def __init__(self, poems: list[Poem], tasks: dict[str, MixedTask], tokenizer: Tokenizer, block_size: int,
                 loss_on: str = "assistant", seed: int = 0, unknown: Counter | None = None):
        if not tokenizer.has_chat_markers:
            raise UserError("the chat format needs a tokenizer with the chat markers (Tokenizer.with_chat_markers)")
        self.tasks, self.maker = tasks, ConversationMaker(poems, tasks)
        self.tokenizer, self.block_size, self.loss_on, self.seed, self.unknown = \
            tokenizer, block_size, loss_on, seed, unknown
        longest = {name: max(tasks[name].phrasings, key=lambda t: len(tokenizer.encode(t.format(form="五言絕句"))))
                   for name in tasks}
        self.openings: list[tuple[Poem, list[str]]] = []  # each poem that can open, and the tasks it can open with
        for poem in poems:
            form = form_name(poem.body) or ""
            fitting = []
            for name in tasks:
                if "{form}" in longest[name] and not form:
                    continue
                turn = _task_turn(name, poem, longest[name].format(form=form))
                if turn is not None and self.fits(exchange(turn)):
                    fitting.append(name)
            if fitting:
                self.openings.append((poem, fitting))
        self.dropped = len(poems) - len(self.openings)
        self._drawn: tuple[int, list[list[Message]]] | None = None  # the last epoch drawn: a step asks many times
        self._cached: tuple[int, list[EncodedSample]] | None = None

    def fits(self, messages: list[Message]) -> bool:
        # The inputs are one id shorter than the conversation: the last id is only a label.
        return len(encode_conversation(self.tokenizer, messages, self.loss_on).inputs) <= self.block_size

    def conversations(self, epoch: int) -> list[list[Message]]:
        """This epoch's conversations, one per poem that can open one (the last epoch drawn is kept)."""
        if self._drawn is None or self._drawn[0] != epoch:
            rng = random.Random(f"conversation mixture {self.seed} {epoch}")  # str seeds hash the same everywhere
            drawn = [self.maker.conversation(rng, poem, self.fits, fitting) for poem, fitting in self.openings]
            assert all(drawn), "a poem's opening task fits in every phrasing"
            self._drawn = (epoch, drawn)
        return self._drawn[1]

    def describe(self, epoch: int) -> str:
        """How many conversations of 1, 2, 3 exchanges the epoch has, with a system prompt, and each follow-up."""
        conversations = self.conversations(epoch)
        turns = Counter(sum(m["role"] == "user" for m in c) for c in conversations)
        systems = sum(c[0]["role"] == "system" for c in conversations)
        return (f"{len(conversations):,} conversations, "
                + ", ".join(f"{turns[n]:,} of {n} exchange{'s' * (n > 1)}" for n in sorted(turns))
                + f"; {systems:,} with a system prompt")

    def rows(self, epoch: int) -> list[EncodedSample]:
        """This epoch's encoded conversations (the last epoch asked for is kept)."""
        if self._cached is None or self._cached[0] != epoch:
            rows = [encode_conversation(self.tokenizer, c, self.loss_on, self.unknown)
                    for c in self.conversations(epoch)]
            self._cached = (epoch, rows)
        return self._cached[1]

    def __len__(self) -> int:
        return len(self.openings)  # one conversation a poem that can open one, every epoch

