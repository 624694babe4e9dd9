"""Rollouts: the requests a rule can judge, the answers a policy samples for them, and their rewards.

What reinforcement learning (rl.py) and rejection sampling share. A request is a prompt of
one of the tasks the rules of rewards.py can judge (data/tasks.py: a poem for a title, a
poem of a form, an acrostic, a continuation), asked with one of its phrasings. The policy
answers each request `group_size` times; each answer keeps the token ids the policy
sampled (the RL loss is computed on exactly those) and its reward.

    request   task, instruction, input (and the form the form task asks for)
    rollout   the request, the answer's token ids and text, whether it stopped, its Reward
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from data.corpus import Poem
from data.errors import UserError
from data.forms import FORMS, acrostic_head, clauses, form_name
from data.instruct import IGNORE, prompt_ids
from data.tasks import TASKS, parse_tasks, task_instruction
from data.tokenizer import Tokenizer
from model import GPT
from tanggpt.device import Runtime
from tanggpt.prosody import RhymeConstraint
from tanggpt.rewards import TASK_RULES, Reward, RewardWeights, task_reward
from tanggpt.rule_targets import Target, answer_targets, place_targets, target_masks

RL_TASKS = tuple(TASK_RULES)  # the tasks a rule can judge: poem, form, acrostic, continue


@dataclass(frozen=True)
class Request:
    task: str  # one of RL_TASKS
    instruction: str
    input: str  # the title; for acrostic the heads; for continue the first couplet
    form: str = ""  # the form task's form


@dataclass(frozen=True)
class Rollout:
    request: Request
    ids: list[int]  # the answer as sampled, end-of-text last if it stopped
    text: str  # the answer's text, without end-of-text
    stopped: bool
    reward: Reward

    @property
    def shape(self) -> int:
        return answer_shape(self.request, self.text)


# The tasks whose instruction leaves the poem's length to the poet: a title, or a poem's opening
# to continue. The form task asks for a form; the acrostic's heads count its clauses.
FREE_SHAPE_TASKS = ("poem", "continue")


def answer_shape(request: Request, answer: str) -> int:
    """For a task that leaves the length free, the clause count of the form the poem is nearest
    (4, a 絕句, for 6 clauses or fewer; else 8, a 律詩), counting a continuation's given couplet;
    0 for a task whose instruction fixes the length. What a fair comparison holds fixed: with
    fewer rhymes to get right, a quatrain passes every rule more often than a 律詩 of the same
    skill, and a comparison across shapes teaches the policy to write quatrains only
    (docs/rl.md, the shortcuts)."""
    if request.task not in FREE_SHAPE_TASKS:
        return 0
    poem = f"{request.input}\n{answer}" if request.task == "continue" else answer
    return 4 if len(clauses(poem)) <= 6 else 8


def parse_rl_tasks(text: str, flag: str = "--tasks") -> dict[str, float]:
    """A comma-separated list of RL_TASKS (or `all`), each once, each optionally with a weight
    (`acrostic:2` is asked twice as often as a task of weight 1): task -> weight."""
    if text.strip() == "all":
        return {task: 1.0 for task in RL_TASKS}
    names = [item.partition(":")[0].strip() for item in text.split(",") if item.strip()]
    if not names or any(name not in RL_TASKS for name in names) or len(set(names)) != len(names):
        raise UserError(f"{flag} {text!r}: give `all` or a comma-separated list of {', '.join(RL_TASKS)}, each once "
                        "and optionally with a weight, e.g. acrostic:2 (the title task has no rule to judge it)")
    return {name: task.weight for name, task in parse_tasks(text, flag).items()}


def make_requests(poems: list[Poem], tasks: dict[str, float], seed: int, held_out: bool = False) -> list[Request]:
    """One request per poem that can serve: its task drawn among `tasks` by their weights (those
    the poem can serve: an acrostic needs the heads of a 絕句 or 律詩, a continuation its first couplet), the
    form task's form drawn among the four, a training phrasing drawn (or the held-out one).
    Seeded: the same poems and seed give the same requests."""
    rng = random.Random(seed)
    requests = []
    for poem in poems:
        # The acrostic's heads and the continuation's opening come from a 絕句 or 律詩: the forms
        # whose rhyme and tones the rules can judge.
        judged = form_name(poem.body) is not None
        inputs = {"poem": poem.title, "form": poem.title, "acrostic": acrostic_head(poem.body) if judged else "",
                  "continue": poem.lines[0] if judged and TASKS["continue"].sample(poem, "") is not None else ""}
        usable = [task for task in tasks if inputs[task]]
        if not usable:
            continue
        task = rng.choices(usable, weights=[tasks[t] for t in usable])[0]
        form = rng.choice(list(FORMS)) if task == "form" else ""
        phrasings = TASKS[task].held_out if held_out else TASKS[task].phrasings
        instruction = task_instruction(task, form, held_out, phrasing=rng.randrange(len(phrasings)))
        requests.append(Request(task, instruction, inputs[task], form))
    return requests


def fitting(requests: list[Request], tokenizer: Tokenizer, block_size: int, answer_room: int) -> list[Request]:
    """The requests whose prompt leaves `answer_room` tokens of the block for the answer."""
    return [r for r in requests if len(prompt_ids(tokenizer, r.instruction, r.input)) + answer_room <= block_size]


@torch.no_grad()
def roll_out(model: GPT, tokenizer: Tokenizer, requests: list[Request], group_size: int, runtime: Runtime,
             max_new_tokens: int, temperature: float, generator: torch.Generator,
             weights: RewardWeights | None = None, batch_size: int = 64) -> list[Rollout]:
    """Each request answered group_size times (consecutive in the result), in batches of
    batch_size rows with the KV cache, each answer scored by the rules (rewards.task_reward)."""
    rows = [r for r in requests for _ in range(group_size)]
    rollouts = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [prompt_ids(tokenizer, r.instruction, r.input) for r in chunk]
        with runtime.autocast():
            answers = model.generate(prompts, max_new_tokens, temperature=temperature, stop_ids=[tokenizer.eot_id],
                                     generator=generator)
        for request, ids in zip(chunk, answers):
            stopped = bool(ids) and ids[-1] == tokenizer.eot_id
            text = tokenizer.decode(ids[:-1] if stopped else ids)
            reward = task_reward(request.task, text, stopped, request.input, request.form, weights)
            rollouts.append(Rollout(request, ids, text, stopped, reward))
    return rollouts


def rollout_rows(tokenizer: Tokenizer, rollouts: list[Rollout]) -> list[tuple[list[int], list[int]]]:
    """(inputs, labels) of each rollout: the prompt and the answer's own sampled ids, labelled on
    the answer (its end-of-text too, if it stopped), in the layout data/instruct.encode_sample
    gives a training sample."""
    rows = []
    for rollout in rollouts:
        prompt = prompt_ids(tokenizer, rollout.request.instruction, rollout.request.input)
        ids = prompt + rollout.ids
        rows.append((ids[:-1], [IGNORE] * (len(prompt) - 1) + rollout.ids))
    return rows


def rollout_target_rows(tokenizer: Tokenizer, rollouts: list[Rollout], constraint: RhymeConstraint
                        ) -> tuple[list[list[int]], torch.Tensor]:
    """For each rollout, a row laid out as rollout_rows' labels, holding at each place of the
    answer a rule decides (rule_targets.answer_targets: the acrostic heads, the rhyme groups) the
    index of its allowed set, IGNORE elsewhere; and the sets' masks ((sets, vocab) bool). Needs
    the char tokenizer (one id, one character); an answer holding an id of more than one
    character (<unk>) gets no targets, its characters and ids no longer lining up."""
    sets: dict[Target, int] = {}
    rows = []
    for rollout in rollouts:
        request = rollout.request
        first = len(prompt_ids(tokenizer, request.instruction, request.input)) - 1  # predicts the answer's 1st id
        answer = rollout.ids[:-1] if rollout.stopped else rollout.ids
        aligned = len(tokenizer.decode(answer)) == len(answer)
        targets = answer_targets(request.task, request.input, rollout.text) if aligned else []
        rows.append(place_targets(first + len(rollout.ids), first, targets, sets))
    return rows, target_masks(tokenizer, list(sets), constraint)


def best_of_groups(rollouts: list[Rollout], group_size: int, min_reward: float = 0.0,
                   same_shape: bool = False) -> list[Rollout | None]:
    """Rejection sampling's choice: for each group of `group_size` consecutive rollouts (one
    request's answers), the answer with the highest reward among those that stopped (an answer
    cut off mid-poem is no target to learn; the first among equals), or None when none stopped
    or the best scored below `min_reward`. With `same_shape`, only answers of the shape the
    group's first answer has (answer_shape: the policy's own draw) compete, so the kept answers
    are as often quatrains as the policy's answers are."""
    best = []
    for start in range(0, len(rollouts), group_size):
        group = rollouts[start : start + group_size]
        candidates = [r for r in group if r.stopped and (not same_shape or r.shape == group[0].shape)]
        top = max(candidates, key=lambda r: r.reward.total, default=None)
        best.append(top if top is not None and top.reward.total >= min_reward else None)
    return best
