"""What evaluate.py measures, for one checkpoint: every figure of its table, and the tables.

For each checkpoint:
- loss (nats per token) and bits per character on the whole pretrain-val text, in
  consecutive block_size windows, and on the responses of the finetune-val samples, the
  figure finetune.py and align.py log too (data.tasks.finetune_val_rows: the regular-form
  finetune-val poems whose sample fits block_size; poem and end-of-text tokens);
- poems written for unseen titles (the first --num-titles of finetune-val, or every poem
  of --eval-poems DIR, its first --num-titles if typed; a title whose prompt does not fit
  a checkpoint's block is left out): stop rate (ended with end-of-text within the limit),
  regular-form rate, mean length, distinct-2, and the share of generated lines found verbatim in the
  training poems (memorisation); and, over the answers shaped as 絕句/律詩 (4 or 8 lines of
  5 or 7 characters), the share that rhyme, rhyme in a level tone, and keep the tonal
  pattern by the Pingshui table (prosody.py), beside the same for the real poems of the
  same titles, the ceiling; and the model's own loss on its stopped answers (what the
  sampler's choices, --rhyme's among them, cost in the model's eyes);
- title-conditioning gain: log-likelihood of each finetune-val poem under its own title
  minus under another poem's title, in nats per poem, with its standard error.
  Positive means the model reads the title; about 0 means it ignores it;
- for a tuned checkpoint, instruction following (data/tasks.py), each task asked with its
  training phrasings and again with its held-out phrasing, on --task-prompts unseen
  inputs: title -> poem (stop, regular form); form control (the share in the form asked
  for, per form); acrostic (every clause opens with its head character, and per clause)
  on the heads of finetune-val 絕句 and 律詩 (4 or 8 heads) and on 20 common heads such as
  春夏秋冬; continuation
  (stops, keeps the given lines' length, repeats no given line); titling a poem (the true
  title's log-likelihood given its poem minus given another poem, nats); and, from the same
  answers, the reward the RL stage trains on (tanggpt/rewards.py, default RewardWeights) for
  each task a rule judges (poem, the four forms together, acrostic on unseen heads,
  continue): its mean, and each rule's pass rate (the share of answers keeping it fully).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

from data.conversations import prompt_in_format, rows_in_format
from data.corpus import Poem, pretrain_text
from data.errors import UserError
from data.forms import FORMS, acrostic_head, clauses, form_name, is_regular_form
from data.instruct import IGNORE, INSTRUCTION, Sample, sample_length
from data.tasks import TASKS, finetune_val_poems, instructions, task_instruction
from data.tokenizer import Tokenizer
from model import GPT
from tanggpt.checkpoint import answers_prompts, tuned_format
from tanggpt.conversation_evaluation import conversation_figures
from tanggpt.cli import flag
from tanggpt.columns import display_width, pad
from tanggpt.device import Runtime
from tanggpt.generation import SamplingConfig, answer_requests, answer_titles, for_generation
from tanggpt.losses import bits_per_char, input_swap_nll, labelled_nll, response_loss, stream_loss, title_swap_nll
from tanggpt.metrics import acrostic_hits, follows_acrostic, generation_figures, mean_and_standard_error, share_of
from tanggpt.prosody import prosody_figures
from tanggpt.rewards import TASK_RULES, Reward, task_reward


@dataclass
class EvaluationConfig(SamplingConfig):
    """How much to measure: the sampling flags, and the sizes of the evaluation."""

    num_titles: int = flag(200, "titles to write poems for: the first N of finetune-val, or with --eval-poems the "
                                "first N poems of that folder (there, untyped: all of them)")
    task_prompts: int = flag(50, "prompts per task, per form and per phrasing kind (seen, held-out) for the "
                                 "instruction-following figures of a tuned checkpoint, and the rule rewards of "
                                 "the same answers (0 = skip them)")
    batch_size: int = flag(50, "titles generated together, and rows per forward pass for the losses")


def loss_figures(model: GPT, tokenizer: Tokenizer, splits: dict[str, list[Poem]], batch_size: int,
                 runtime: Runtime, seed: int, chat: bool = False) -> dict:
    """pretrain-val and finetune-val response losses, and the title-conditioning gain; with
    `chat`, the finetune-val poems and the titles asked as one-turn conversations."""
    text = pretrain_text(splits["pretrain_val"])
    tokens = tokenizer.encode_array(text)
    figures = {"pretrain_val_loss": stream_loss(model, tokens, batch_size, runtime)}
    figures["pretrain_val_bpc"] = bits_per_char(figures["pretrain_val_loss"], len(tokens), len(text))

    # The finetune-val loss every stage logs (data.tasks.finetune_val_rows), over the same rows
    # (check_measurable has made sure there are some).
    fitting = finetune_val_poems(tokenizer, splits, model.config.block_size, rows=rows_in_format(chat))
    # The title gain, on every finetune-val poem whose sample fits under its own title and another's.
    swap = title_swap_nll(model, tokenizer, splits["finetune_val"], batch_size, runtime, seed, chat)
    rows = [row for _, row in fitting]
    figures["finetune_val_loss"] = response_loss(model, rows, tokenizer.eot_id, batch_size, runtime)
    response_tokens = sum(sum(label != IGNORE for label in labels) for _, labels in rows)
    response_chars = sum(len(poem.body) for poem, _ in fitting)
    figures["finetune_val_bpc"] = bits_per_char(figures["finetune_val_loss"], response_tokens, response_chars)
    # None where fewer than 2 poems fit under two titles (titles too long for the block): nothing to compare
    gain, gain_se = mean_and_standard_error(swap.gains.tolist()) if len(swap.poems) >= 2 else (None, None)
    figures.update(title_gain=gain, title_gain_se=gain_se, title_gain_poems=len(swap.poems))
    return figures


def check_measurable(model: GPT, tokenizer: Tokenizer, splits: dict[str, list[Poem]], where: str) -> None:
    """Refuse, before any figure is measured, a checkpoint whose block_size leaves fewer than
    2 finetune-val poems for the finetune-val loss (`where`: its flag and path, for the message)."""
    fitting = len(finetune_val_poems(tokenizer, splits, model.config.block_size))
    if fitting < 2:
        raise UserError(f"{where}: only {fitting} regular-form finetune-val poems fit its block_size "
                        f"{model.config.block_size}; use a larger --poems folder")


def title_fits(tokenizer: Tokenizer, title: str, block_size: int, instruction: str = INSTRUCTION,
               chat: bool = False) -> bool:
    """Whether the prompt asking for a poem on `title` (in the chat template, with `chat`)
    leaves room in block_size for an answer.

    A longer prompt would be cropped from the front by GPT.generate_stream, <INS> and the
    instruction first: the model would answer a request it no longer sees."""
    return len(prompt_in_format(tokenizer, instruction, title, chat)) < block_size


def evaluate_checkpoint(ckpt: dict, model: GPT, tokenizer: Tokenizer, config: EvaluationConfig,
                        splits: dict[str, list[Poem]], titles: list[str], training_lines: set[str],
                        runtime: Runtime, allowed: Callable | None = None) -> dict:
    """Every figure of the table for one checkpoint (its model and tokenizer, adapters merged).
    `allowed`: the sampler's constraint (config.constraint(tokenizer), built by the caller
    before any checkpoint's work starts, so a tokenizer --rhyme cannot use fails first)."""
    start = time.perf_counter()
    model = model.to(runtime.device).eval()
    lora = f" + LoRA r{ckpt['lora']['rank']}" if "lora" in ckpt else ""
    chat = tuned_format(ckpt) == "chat"  # asked in the chat template, every figure the same request
    figures = {"kind": ckpt["kind"] + lora + (" (chat)" if chat else ""), "parameters": model.num_params()}
    figures.update(loss_figures(model, tokenizer, splits, config.batch_size, runtime, config.seed, chat))

    writer = for_generation(copy.deepcopy(model), runtime)  # a copy: `model` stays fp32 for the answers' loss
    answers = answer_titles(writer, tokenizer, titles, runtime, config.max_new_tokens, seed=config.seed,
                            batch_size=config.batch_size, allowed=allowed, chat=chat,
                            **config.generate_kwargs())
    figures.update(generation_figures([a.response for a in answers], [a.stopped for a in answers], training_lines))
    figures.update(prosody_figures([a.response for a in answers]))
    # What the sampler's choices cost in the model's own eyes (--rhyme overrides it at the
    # rhyme positions): the fp32 model's loss on its stopped answers, poem and end-of-text.
    scored = [Sample(INSTRUCTION, a.title, a.response) for a in answers if a.stopped]
    rows = [row for row in rows_in_format(chat)(tokenizer, scored, model.config.block_size) if row is not None]
    figures["answer_loss"] = None  # no answer stopped: nothing to score
    if rows:
        nll, count = labelled_nll(model, rows, tokenizer.eot_id, config.batch_size, runtime)
        figures["answer_loss"] = float(nll.sum() / count.sum())
    if config.task_prompts and answers_prompts(ckpt["kind"]):  # a base model was never asked anything
        figures["instructions"] = instruction_figures(model, writer, tokenizer, splits["finetune_val"], config,
                                                      runtime, chat)
        if chat:  # and past one request: follow-ups and system prompts
            figures["conversations"] = conversation_figures(model, writer, tokenizer, splits["finetune_val"], config,
                                                            config.task_prompts, config.batch_size, runtime)
    figures["seconds"] = time.perf_counter() - start
    return figures


# Acrostic heads a user might ask for: four characters each, none taken from a poem's head.
COMMON_HEADS = ("春夏秋冬", "風花雪月", "琴棋書畫", "梅蘭竹菊", "江山如畫", "天長地久", "山高水長", "花好月圓",
                "一帆風順", "萬事如意", "福壽安康", "金玉滿堂", "青山綠水", "日月星辰", "詩酒年華", "鳥語花香",
                "雲淡風輕", "明月清風", "春華秋實", "千山萬水")


# The tasks a rule judges (TASK_RULES; the title task is none of them), as the reward rows name them.
REWARD_TASKS = {"poem": "title -> poem", "form": "form, all four", "acrostic": "acrostic, unseen heads",
                "continue": "continue"}


def reward_key(task: str) -> str:
    """The figure of `task`'s mean reward, in instruction_figures' figures."""
    return f"reward {task}"


def rule_key(task: str, rule: str) -> str:
    """The figure of `rule`'s pass rate on `task`'s answers, in instruction_figures' figures."""
    return f"rule {task} {rule}"


def reward_figures(task: str, rewards: list[Reward]) -> dict[str, float | None]:
    """The mean reward of `task`'s answers, and for each rule of TASK_RULES[task] its pass rate:
    the share of answers keeping the rule fully (value 1.0, which a rule gives exactly when every
    clause or rhyme it counts is right). The mean shows partial credit, what GRPO learns from;
    the pass rate, how often the rule is wholly kept, what a reader asks of a poem. Each None
    when nothing was asked."""
    if not rewards:
        return {reward_key(task): None, **{rule_key(task, rule): None for rule in TASK_RULES[task]}}
    figures = {reward_key(task): sum(r.total for r in rewards) / len(rewards)}
    for rule in TASK_RULES[task]:
        figures[rule_key(task, rule)] = sum(r.rules[rule] == 1.0 for r in rewards) / len(rewards)
    return figures


def instruction_figures(model: GPT, writer: GPT, tokenizer: Tokenizer, poems: list[Poem], config: EvaluationConfig,
                        runtime: Runtime, chat: bool = False) -> dict[str, dict]:
    """Does the model follow each task's instruction? {"seen": figures, "held_out": figures}.

    The same inputs are asked twice: with the training phrasings (taking turns) and with
    the held-out phrasing no training sample used. `poems` are unseen (finetune-val) ones.
    An input whose prompt would not fit the block in every phrasing is not asked; a figure
    nothing could be asked for (no poem of two text lines to continue, say) is None. With
    `chat`, each request is the user's turn of a one-turn conversation (a chat model's format).
    """
    n, block_size = config.task_prompts, model.config.block_size

    longest_phrasing = {name: max((t for held in (False, True) for t in instructions(task, held)),
                                  key=lambda t: len(tokenizer.encode(t))) for name, task in TASKS.items()}

    def fits(text: str, *tasks: str) -> bool:
        """Whether the prompt of `text` leaves room for an answer in every phrasing of `tasks`."""
        return all(title_fits(tokenizer, text, block_size, longest_phrasing[task], chat) for task in tasks)

    titles = [p.title for p in poems if fits(p.title, "poem", "form")][:n]  # asked for a poem, and in each form
    # The heads of unseen 絕句 and 律詩 (4 or 8 heads): the acrostics the RL stage trains and its
    # rewards judge. A long regulated poem (排律) has 10 to 44 heads, a poem the block of a small
    # model cannot hold: asked for them, the model could only fail, whatever it learned.
    heads = {"unseen": [h for h in (acrostic_head(p.body) for p in poems if form_name(p.body))
                        if fits(h, "acrostic")][:n],
             "common": [h for h in COMMON_HEADS if fits(h, "acrostic")][:n]}
    openings = [p for p in poems if TASKS["continue"].sample(p, "") is not None and fits(p.lines[0], "continue")][:n]
    longest = max(len(tokenizer.encode(t)) for held in (False, True) for t in instructions(TASKS["title"], held))
    titled = [p for p in poems  # poems whose title-task sample fits the block, in every phrasing
              if sample_length(longest, len(tokenizer.encode(p.body)), len(tokenizer.encode(p.title))) <= block_size]
    titled = titled[:n]

    figures = {}
    for kind in ("seen", "held_out"):
        def ask(task: str, inputs: list[str], form: str = "") -> list:
            if not inputs:
                return []
            requests = [(task_instruction(task, form, kind == "held_out", phrasing=i), text)
                        for i, text in enumerate(inputs)]
            return answer_requests(writer, tokenizer, requests, runtime, config.max_new_tokens, seed=config.seed,
                                   batch_size=config.batch_size, chat=chat, **config.generate_kwargs())

        f = {}
        # Each judged task's rewards, from the answers its own figures are measured on: the
        # rules score the very answers the table reports, with no sampling of their own.
        rewards: dict[str, list[Reward]] = {task: [] for task in REWARD_TASKS}
        answers = ask("poem", titles)
        f["poem_stop"] = share_of(a.stopped for a in answers)
        f["poem_regular"] = share_of(is_regular_form(a.response) for a in answers)
        rewards["poem"] = [task_reward("poem", a.response, a.stopped, a.input) for a in answers]
        for form in FORMS:
            answers = ask("form", titles, form)
            f[f"form {form}"] = share_of(form_name(a.response) == form for a in answers)
            rewards["form"] += [task_reward("form", a.response, a.stopped, a.input, form) for a in answers]
        for name, asked in heads.items():
            answers = ask("acrostic", asked)
            if name == "unseen":  # unseen inputs, as for the other tasks; the 20 set phrases keep their own rows
                rewards["acrostic"] = [task_reward("acrostic", a.response, a.stopped, a.input) for a in answers]
            f[f"acrostic_{name}"] = share_of(follows_acrostic(a.response, h) for a, h in zip(answers, asked))
            f[f"acrostic_{name}_lines"] = (sum(acrostic_hits(a.response, h) for a, h in zip(answers, asked))
                                           / sum(map(len, asked))) if asked else None
        answers = ask("continue", [p.lines[0] for p in openings])
        given = [clauses(p.lines[0]) for p in openings]
        f["continue_stop"] = share_of(a.stopped for a in answers)
        f["continue_length"] = share_of(bool(clauses(a.response))
                                        and {len(c) for c in clauses(a.response)} == {len(g[0])}
                                        for a, g in zip(answers, given))
        f["continue_no_repeat"] = share_of(not set(g) & set(clauses(a.response)) for a, g in zip(answers, given))
        rewards["continue"] = [task_reward("continue", a.response, a.stopped, a.input) for a in answers]
        for task, task_rewards in rewards.items():
            f.update(reward_figures(task, task_rewards))
        samples = [Sample(task_instruction("title", held_out=kind == "held_out", phrasing=i), p.body, p.title)
                   for i, p in enumerate(titled)]
        swap = input_swap_nll(model, tokenizer, samples, config.batch_size, runtime, config.seed, chat)
        # None where fewer than 2 poems fit the block (a tiny model's): nothing to compare
        f["title_task_gain"], f["title_task_gain_se"] = (mean_and_standard_error(swap.gains.tolist())
                                                         if len(swap.poems) >= 2 else (None, None))
        figures[kind] = f
    return figures


ROWS = [  # (key, label, format)
    ("kind", "kind", "{}"),
    ("pretrain_val_loss", "pretrain-val loss (nats/token)", "{:.4f}"),
    ("pretrain_val_bpc", "pretrain-val bits/char", "{:.3f}"),
    ("finetune_val_loss", "finetune-val response loss", "{:.4f}"),
    ("finetune_val_bpc", "finetune-val response bits/char", "{:.3f}"),
    ("stop_rate", "stop rate", "{:.1%}"),
    ("regular_form_rate", "regular form", "{:.1%}"),
    ("mean_length", "mean length (chars)", "{:.1f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("memorised_lines", "memorised lines", "{:.1%}"),
    ("answer_loss", "answers' loss (nats/token)", "{:.3f}"),
    ("regular_shaped", "4/8 lines of 5/7 characters", "{}"),
    ("eight_clause_rate", "  of these: 8 lines, not 4", "{:.1%}"),
    ("rhyme_rate", "  of these: rhyme (Pingshui)", "{:.1%}"),
    ("distinct_rhyme_rate", "  rhyme, no rhyme char repeated", "{:.1%}"),
    ("level_rhyme_rate", "  rhyme in a level tone", "{:.1%}"),
    ("tonal_pattern_rate", "  keep the tonal pattern", "{:.1%}"),
    ("title_gain", "title gain (nats/poem)", None),
    ("seconds", "seconds", "{:.0f}"),
]


def format_table(columns: dict[str, dict]) -> str:
    """One row per figure, one column per checkpoint (and "–" where a column has no such figure)."""
    names = list(columns)
    width = max(14, *(display_width(n) + 2 for n in names))
    lines = [pad("", 32) + "".join(pad(n, width, ">") for n in names)]
    for key, label, fmt in ROWS:
        cells = []
        for figures in columns.values():
            if figures.get(key) is None:  # not measured for this column, or nothing to measure
                cells.append("–")
            elif key == "title_gain":
                cells.append(f"{figures['title_gain']:.2f} ± {figures['title_gain_se']:.2f}")
            else:
                cells.append(fmt.format(figures[key]))
        lines.append(pad(label, 32) + "".join(pad(c, width, ">") for c in cells))
    return "\n".join(lines)


INSTRUCTION_ROWS = [  # (key, label, format), per phrasing kind
    ("poem_stop", "title -> poem: stop", "{:.0%}"),
    ("poem_regular", "  regular form", "{:.0%}"),
    *((f"form {form}", f"form: {form}", "{:.0%}") for form in FORMS),
    ("acrostic_unseen", "acrostic, unseen heads: all", "{:.0%}"),
    ("acrostic_unseen_lines", "  per line", "{:.0%}"),
    ("acrostic_common", "acrostic, common heads: all", "{:.0%}"),
    ("acrostic_common_lines", "  per line", "{:.0%}"),
    ("continue_stop", "continue: stop", "{:.0%}"),
    ("continue_length", "  keeps the line length", "{:.0%}"),
    ("continue_no_repeat", "  repeats no given line", "{:.0%}"),
    ("title_task_gain", "title a poem: gain (nats)", "{:.2f}"),
]

# Per judged task: its mean reward, then each rule's pass rate, under the rule's name (the
# name of its --...-weight flag, where tanggpt/rewards.py describes it).
REWARD_ROWS = [row for task, label in REWARD_TASKS.items()
               for row in ((reward_key(task), f"{label}: reward", "{:.2f}"),
                           *((rule_key(task, rule), f"  {rule.replace('_', ' ')}", "{:.0%}")
                             for rule in TASK_RULES[task]))]


def format_instruction_table(columns: dict[str, dict]) -> str:
    """Per task, seen and held-out phrasings side by side, for each checkpoint measured."""
    columns = {name: f["instructions"] for name, f in columns.items() if f.get("instructions")}
    if not columns:
        return ""
    width = max(16, *(display_width(n) + 2 for n in columns))
    lines = [pad("instruction following", 32) + "".join(pad(n, 2 * width, ">") for n in columns),
             pad("", 32) + (pad("seen", width, ">") + pad("held-out", width, ">")) * len(columns)]

    def row(key: str, label: str, fmt: str) -> str:
        """A figure's line, "–" where it is None or absent (figures saved before the rewards existed)."""
        cells = ["–" if f[kind].get(key) is None else fmt.format(f[kind][key])
                 for f in columns.values() for kind in ("seen", "held_out")]
        return pad(label, 32) + "".join(pad(c, width, ">") for c in cells)

    lines += [row(*spec) for spec in INSTRUCTION_ROWS]
    lines.append("rule rewards (default weights): the mean, then each rule's pass rate")
    lines += [row(*spec) for spec in REWARD_ROWS]
    return "\n".join(lines)
