"""What evaluate.py measures of a chat model (finetune.py --format chat) past one request: conversations.

On unseen (finetune-val) poems, each follow-up of data/conversations.py is asked in
--task-prompts conversations, with the training phrasings in turn ("seen") and again with
the held-out phrasing ("held-out"), as the instruction figures ask the tasks:

- first turn: title -> poem, the model's own answer (stop, regular form). The follow-ups
  about "this poem" are asked after it: the model reads back its own words, as in a
  conversation with a user;
- title_it: after an acrostic request answered by a real poem (its title never named), the
  real title's log-likelihood as the answer minus another poem's title's (nats): does the
  model title the poem in the conversation? (A likelihood: the model's own poem has no
  true title to compare with.);
- form_of_it: the form of its own poem named (over the first answers of a regular form);
- continue_it: after its own opening couplet on a title (先寫頭兩句), the rest: stops,
  keeps the couplet's line length, repeats none of its clauses;
- same_title: another poem on the title: stops, regular form, shares no line with the first;
- same_title_form: a poem of the form asked for (the four in turn, a form whose poem would
  not fit the block skipped for the next);
- same_title_acrostic: every clause opens with its head (the heads of another unseen 絕句);
- next: a new request (a form, on another unseen title): the model answers the last
  request, not the first;
- system prompts: a rule a program can check (你只寫五言詩 / 七言詩) before the first request:
  the share of answers whose every clause keeps the length, beside the same share of the
  same titles' answers with no system prompt.

A conversation is asked only where its prompt leaves room in block_size for the answer
asked for (a training conversation always fits, data/conversations.py): a follow-up asking
for a long poem is asked after the shorter first answers. Each kind reports how many
conversations it asked. A follow-up's answer is cut a couplet past a 七言律詩 (the
first turns run to --max-new-tokens, as every single request does).
"""

from __future__ import annotations

from collections import Counter

import torch

from data.chat import encode_conversation, render_ids
from data.conversations import FOLLOW_UPS, OPENING, SYSTEM_PROMPTS, Message, request_messages, request_text
from data.corpus import Poem
from data.forms import FORMS, acrostic_head, clauses, form_name, is_regular_form
from data.tasks import task_instruction
from data.tokenizer import Tokenizer
from model import GPT
from tanggpt.columns import display_width, pad
from tanggpt.device import Runtime
from tanggpt.generation import SamplingConfig, answer_conversations
from tanggpt.losses import labelled_nll
from tanggpt.metrics import follows_acrostic, mean_and_standard_error, share_of, text_lines

FORM_ORDER = list(FORMS)  # asked in turn
TITLE_ROOM = 16  # title_it asks about poems whose title is at most this many ids
POOL = 3  # first turns asked, per conversation of a kind: the kinds that need room pick among them


def poem_room(tokenizer: Tokenizer, length: int, count: int) -> int:
    """The ids a poem of `count` clauses of `length` characters takes, laid out as the corpus
    lays a poem (a couplet a line), with the <|end|> that closes the turn."""
    couplet = "山" * length + "，" + "山" * length + "。"
    return len(tokenizer.encode("\n".join([couplet] * (count // 2)))) + 1


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def conversation_figures(model: GPT, writer: GPT, tokenizer: Tokenizer, poems: list[Poem], config: SamplingConfig,
                         n: int, batch_size: int, runtime: Runtime) -> dict[str, dict]:
    """{"seen": figures, "held_out": figures}, each figure described in the module doc, and
    "asked <kind>": how many conversations each measured. `model` (fp32) scores the titles,
    `writer` (evaluate_checkpoint's copy in the runtime's precision) answers; `poems` are unseen."""
    block_size = model.config.block_size
    figures = {}
    for kind in ("seen", "held_out"):
        held = kind == "held_out"

        def phrase(training: tuple[str, ...], held_out: tuple[str, ...], i: int) -> str:
            return held_out[0] if held else training[i % len(training)]

        def answer(conversations: list[list[Message]], limit: int = config.max_new_tokens) -> list[tuple[str, bool]]:
            if not conversations:
                return []
            return answer_conversations(writer, tokenizer, conversations, runtime, min(limit, config.max_new_tokens),
                                        seed=config.seed, batch_size=batch_size, **config.generate_kwargs())

        def fits(messages: list[Message], room: int) -> bool:
            """Whether the prompt leaves `room` ids for the answer in block_size."""
            return len(render_ids(tokenizer, messages, add_generation_prompt=True)) + room <= block_size

        longest = poem_room(tokenizer, 7, 8)  # a 七言律詩
        # A follow-up's answer is cut a couplet past the longest poem: longer, it answers no request
        # here, and a batch runs as long as its longest answer (past the block, without the cache).
        follow_up_limit = longest + poem_room(tokenizer, 7, 2)
        f: dict[str, float | int | None] = {}

        # First turns: title -> poem, on up to POOL * n titles whose request leaves room for any form.
        firsts = [request_messages(task_instruction("poem", held_out=held, phrasing=i), p.title)
                  for i, p in enumerate(poems)]
        pool = [(p, m) for p, m in zip(poems, firsts) if fits(m, longest)][: POOL * n]
        written = answer([m for _, m in pool])
        f["first_stop"] = share_of(stopped for _, stopped in written)
        f["first_regular"] = share_of(is_regular_form(text) for text, _ in written)
        f["asked first"] = len(written)
        # The conversations that go on: a first answer that stopped, kept in the history.
        histories = [(p, m + [_assistant(text)], text) for (p, m), (text, stopped) in zip(pool, written) if stopped]

        def follow(build) -> tuple[list, list[tuple[str, bool]]]:
            """Up to n conversations built from the histories (build -> (messages, room, what the
            check needs) or None), those whose prompt leaves room, and the model's answers."""
            asked = []
            for poem, history, first in histories:
                built = build(len(asked), poem, history, first)
                if built is not None and fits(built[0], built[1]):
                    asked.append(built)
                if len(asked) == n:
                    break
            return asked, answer([messages for messages, _, _ in asked], follow_up_limit)

        spec = FOLLOW_UPS["form_of_it"]
        asked, answers = follow(lambda i, p, h, first: (h + [_user(phrase(spec.phrasings, spec.held_out, i))],
                                                        len(tokenizer.encode("五言絕句")) + 1, form_name(first))
                                if form_name(first) else None)
        f["form_of_it"] = share_of(text.strip() == form for (_, _, form), (text, _) in zip(asked, answers))
        f["asked form_of_it"] = len(asked)

        spec = FOLLOW_UPS["same_title"]
        asked, answers = follow(lambda i, p, h, first: (h + [_user(phrase(spec.phrasings, spec.held_out, i))],
                                                        poem_room(tokenizer, 7, 4), first))
        f["same_title_stop"] = share_of(stopped for _, stopped in answers)
        f["same_title_regular"] = share_of(is_regular_form(text) for text, _ in answers)
        f["same_title_new"] = share_of(not set(text_lines(text)) & set(text_lines(first))
                                     for (_, _, first), (text, _) in zip(asked, answers))
        f["asked same_title"] = len(asked)

        spec = FOLLOW_UPS["same_title_form"]

        def in_turn(i: int, ask) -> tuple[list[Message], int, str] | None:
            """The four forms in turn (the i-th conversation asked starts at the i-th), the first
            whose poem leaves room after ask(form), the conversation asking it; None if none does."""
            for form in FORM_ORDER[i % 4:] + FORM_ORDER[: i % 4]:
                messages = ask(form)
                if fits(messages, poem_room(tokenizer, *FORMS[form])):
                    return messages, poem_room(tokenizer, *FORMS[form]), form
            return None

        def same_title_form(i: int, poem: Poem, history: list[Message], first: str):
            return in_turn(i, lambda form: history + [_user(phrase(spec.phrasings, spec.held_out, i).format(form=form))])

        asked, answers = follow(same_title_form)
        f["same_title_form"] = share_of(form_name(text) == form for (_, _, form), (text, _) in zip(asked, answers))
        f["asked same_title_form"] = len(asked)
        f["forms same_title_form"] = dict(Counter(form for _, _, form in asked))  # the mix the block allowed

        # The heads of other unseen 絕句, with room for a poem of their length: a 律詩's eight heads
        # after a first poem seldom leave room in the block, in training as here.
        heads = [(acrostic_head(p.body), form_name(p.body)) for p in reversed(poems)
                 if form_name(p.body) in ("五言絕句", "七言絕句")]
        spec = FOLLOW_UPS["same_title_acrostic"]

        def same_title_acrostic(i: int, poem: Poem, history: list[Message], first: str):
            if not heads:
                return None
            head, form = heads[i % len(heads)]
            text = request_text(phrase(spec.phrasings, spec.held_out, i), head)
            return history + [_user(text)], poem_room(tokenizer, *FORMS[form]), head

        asked, answers = follow(same_title_acrostic)
        f["same_title_acrostic"] = share_of(follows_acrostic(text, head)
                                          for (_, _, head), (text, _) in zip(asked, answers))
        f["asked same_title_acrostic"] = len(asked)

        others = list(reversed(poems))  # a new request on another unseen title

        def next_request(i: int, poem: Poem, history: list[Message], first: str):
            other = others[i % len(others)]
            if other.title == poem.title:
                return None
            return in_turn(i, lambda form: history + [_user(request_text(task_instruction("form", form, held, i),
                                                                         other.title))])

        asked, answers = follow(next_request)
        f["next_form"] = share_of(form_name(text) == form for (_, _, form), (text, _) in zip(asked, answers))
        f["asked next"] = len(asked)
        f["forms next"] = dict(Counter(form for _, _, form in asked))

        # continue_it: the model's own opening couplet on a title, then the rest of the poem.
        openings = [[_user(request_text(phrase(OPENING.phrasings, OPENING.held_out, i), p.title))]
                    for i, (p, _) in enumerate(pool)]
        couplets = answer(openings)
        spec = FOLLOW_UPS["continue_it"]
        def is_couplet(couplet: str, stopped: bool) -> bool:
            """One line of two clauses of one length: an opening couplet, whose rest can be asked."""
            given = clauses(couplet)
            return stopped and len(text_lines(couplet)) == 1 and len(given) == 2 and len(given[0]) == len(given[1])

        f["opening_couplet"] = share_of(is_couplet(*c) for c in couplets)
        asked = []
        for opening, (couplet, stopped) in zip(openings, couplets):
            if not is_couplet(couplet, stopped):
                continue  # there is no rest to ask for
            given = clauses(couplet)
            messages = opening + [_assistant(couplet), _user(phrase(spec.phrasings, spec.held_out, len(asked)))]
            if fits(messages, poem_room(tokenizer, len(given[0]), 8)):  # room for a 律詩's rest
                asked.append((messages, given))
            if len(asked) == n:
                break
        answers = answer([messages for messages, _ in asked], follow_up_limit)
        f["continue_it_stop"] = share_of(stopped for _, stopped in answers)
        f["continue_it_length"] = share_of(bool(clauses(text)) and {len(c) for c in clauses(text)} == {len(given[0])}
                                         for (_, given), (text, _) in zip(asked, answers))
        f["continue_it_no_repeat"] = share_of(not set(given) & set(clauses(text))
                                            for (_, given), (text, _) in zip(asked, answers))
        f["asked continue_it"] = len(asked)

        f.update(title_it_figures(model, tokenizer, poems, n, held, batch_size, config.seed, runtime))

        # System prompts: the first request with a rule before it, on the pool's first n titles.
        for name in ("five", "seven"):
            rule = SYSTEM_PROMPTS[name]
            ruled = [[{"role": "system", "content": phrase(rule.phrasings, rule.held_out, i)}] + m
                     for i, (_, m) in enumerate(pool[:n])]
            f[f"system_{name}"] = share_of(rule.keeps(text) for text, _ in answer(ruled))
            f[f"no_system_{name}"] = share_of(rule.keeps(text) for text, _ in written[:n])
        f["asked system"] = min(n, len(pool))
        figures[kind] = f
    return figures


def title_it_figures(model: GPT, tokenizer: Tokenizer, poems: list[Poem], n: int, held: bool, batch_size: int,
                     seed: int, runtime: Runtime) -> dict[str, float | int | None]:
    """title_it's gain: in a conversation asking an acrostic answered by the real poem, then
    asking its title, the real title's log-likelihood as the answer minus another poem's
    title's, mean and standard error. A seeded shuffle pairs each of the n poems asked with
    another of them, so every title is once its own poem's and once another's (a long title's
    lower likelihood cancels out of the mean), as tanggpt/losses.input_swap_nll pairs them."""
    spec = FOLLOW_UPS["title_it"]

    def row(i: int, poem: Poem, title: str) -> tuple[list[int], list[int]] | None:
        request = request_text(task_instruction("acrostic", held_out=held, phrasing=i), acrostic_head(poem.body))
        asked = spec.held_out[0] if held else spec.phrasings[i % len(spec.phrasings)]
        conversation = [_user(request), _assistant(poem.body), _user(asked), _assistant(title)]
        inputs, _, labels = encode_conversation(tokenizer, conversation, "last")
        return (inputs, labels) if len(inputs) <= model.config.block_size else None

    # The first n regular poems of distinct titles of at most TITLE_ROOM ids whose conversation
    # fits under a title that long: any of their titles fits any of them, so no pair is lost.
    chosen, titles = [], set()
    for poem in poems:
        if is_regular_form(poem.body) and poem.title not in titles \
                and len(tokenizer.encode(poem.title)) <= TITLE_ROOM and row(len(chosen), poem, "題" * TITLE_ROOM):
            chosen.append(poem)
            titles.add(poem.title)
        if len(chosen) == n:
            break
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed)).tolist()
    other_title = {i: chosen[j].title for i, j in zip(order, order[1:] + order[:1])}
    pairs = [(row(i, p, p.title), row(i, p, other_title[i])) for i, p in enumerate(chosen)]
    if len(pairs) < 2:  # nothing to compare
        return {"title_it_gain": None, "title_it_gain_se": None, "asked title_it": len(pairs)}
    own, _ = labelled_nll(model, [own for own, _ in pairs], tokenizer.eot_id, batch_size, runtime)
    swapped, _ = labelled_nll(model, [swapped for _, swapped in pairs], tokenizer.eot_id, batch_size, runtime)
    gain, se = mean_and_standard_error((swapped - own).tolist())
    return {"title_it_gain": gain, "title_it_gain_se": se, "asked title_it": len(pairs)}


# (key, label, format, the single-turn figure of the same task: an instruction figure's key;
# ("forms", kind): the form-control figures, weighed by the forms the kind asked; or None
# where one request has no such task)
CONVERSATION_ROWS = [
    ("first_stop", "first turn, title -> poem: stop", "{:.0%}", "poem_stop"),
    ("first_regular", "  regular form", "{:.0%}", "poem_regular"),
    ("title_it_gain", "title it: gain (nats)", "{:.2f}", "title_task_gain"),
    ("form_of_it", "name its form", "{:.0%}", None),
    ("opening_couplet", "opening couplet asked: one written", "{:.0%}", None),
    ("continue_it_stop", "continue it: stop", "{:.0%}", "continue_stop"),
    ("continue_it_length", "  keeps the line length", "{:.0%}", "continue_length"),
    ("continue_it_no_repeat", "  repeats no given line", "{:.0%}", "continue_no_repeat"),
    ("same_title_stop", "same title again: stop", "{:.0%}", "poem_stop"),
    ("same_title_regular", "  regular form", "{:.0%}", "poem_regular"),
    ("same_title_new", "  shares no line with the first", "{:.0%}", None),
    ("same_title_form", "same title, a form: the form", "{:.0%}", ("forms", "same_title_form")),
    ("same_title_acrostic", "same title, acrostic: all heads", "{:.0%}", "acrostic_unseen"),
    ("next_form", "a new request (a form): the form", "{:.0%}", ("forms", "next")),
    ("system_five", "system 五言: every clause of 5", "{:.0%}", None),
    ("no_system_five", "  with no system prompt", "{:.0%}", None),
    ("system_seven", "system 七言: every clause of 7", "{:.0%}", None),
    ("no_system_seven", "  with no system prompt", "{:.0%}", None),
]


def single_turn_figure(instructions: dict, single, conversations: dict | None) -> float | None:
    """A single-turn model's figure for a conversation row (CONVERSATION_ROWS' last field);
    a form row's, the form-control rates weighed by the forms a chat model's conversations
    asked (`conversations`: that model's figures of the same phrasing kind), so the two
    columns answer the same mix: a long form seldom leaves room after a first poem."""
    if single is None:
        return None
    if isinstance(single, str):
        return instructions.get(single)
    mix = (conversations or {}).get(f"forms {single[1]}") or {}
    rates = {form: instructions.get(f"form {form}") for form in mix}
    if not mix or None in rates.values():
        return None
    return sum(rates[form] * count for form, count in mix.items()) / sum(mix.values())


def format_conversation_table(columns: dict[str, dict]) -> str:
    """Per follow-up, seen and held-out phrasings side by side: a chat model's figures in
    conversation, and beside them a single-turn model's figure for the same task asked in
    one request (its instruction figures; the forms weighed as the first chat column asked
    them), where the table has such a column."""
    shown = {name: f for name, f in columns.items() if f.get("conversations") or f.get("instructions")}
    if not any(f.get("conversations") for f in shown.values()):
        return ""
    width = max(16, *(display_width(n) + 2 for n in shown))
    lines = [pad("conversations", 34) + "".join(pad(n, 2 * width, ">") for n in shown),
             pad("", 34) + (pad("seen", width, ">") + pad("held-out", width, ">")) * len(shown)]
    chat = next(f["conversations"] for f in shown.values() if f.get("conversations"))  # the first chat column
    for key, label, fmt, single in CONVERSATION_ROWS:
        cells = []
        for f in shown.values():
            for kind in ("seen", "held_out"):
                if f.get("conversations"):
                    value = f["conversations"][kind].get(key)
                else:  # a single-turn model: the same task in one request
                    value = single_turn_figure(f["instructions"][kind], single, chat[kind])
                cells.append("–" if value is None else fmt.format(value))
        lines.append(pad(label, 34) + "".join(pad(c, width, ">") for c in cells))
    for name, f in shown.items():
        if f.get("conversations"):
            counts = " · ".join(f"{k.removeprefix('asked ')} {f['conversations']['seen'][k]}/"
                                f"{f['conversations']['held_out'][k]}"
                                for k in f["conversations"]["seen"] if k.startswith("asked "))
            lines.append(f"{name}: conversations asked (seen/held-out): {counts}")
    return "\n".join(lines)
