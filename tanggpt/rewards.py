"""Rewards the rules check: how the RL stage scores an answer, with no reward model.

DPO (align.py) learns from pairs someone ranked. Reinforcement learning instead samples
several answers to a prompt, scores each, and pushes up the ones that scored above the
others. The score usually comes from a reward model, a network trained on human rankings,
which is costly to build and has its own errors that the policy learns to exploit. What we
ask of a poem can be checked exactly instead: did the answer stop, has it the form asked
for, does every clause open with its acrostic head, do the even clauses rhyme by the
Pingshui table, do the tones alternate, did it copy the prompt or repeat itself. A rule
cannot be flattered, and needs no labels, no training and no GPU.

One function per rule, each a number in [0, 1]. The rules themselves live where the rest of
the course reads them (one home per concept): the forms in data/forms.py, the rhyme and
tones in tanggpt/prosody.py, the acrostic in tanggpt/metrics.py. This module turns them
into rewards.

Partial credit, not pass or fail. GRPO, the RL stage's algorithm, scores a group of answers
to one prompt and trains on each answer's advantage: its reward minus the group's mean,
over the group's spread. A group whose answers all score the same has zero advantage and
teaches nothing. A young model rarely writes a whole 律詩 that rhymes and keeps its tones,
so a pass/fail reward scores most groups all 0. Counting the share of clauses (or rhyme
positions) that are right tells a poem with one bad clause from one with five, and so the
group has something to learn from. Partial credit must not open an easier road, though:
an answer of no regular shape gets 0 for rhyme and tones (not credit for the clauses it
has), and copying the prompt or repeating a line, two cheap ways to rhyme and fill a form,
cost their own rules.

A task's reward (task_reward) is the weighted mean of the rules that apply to it, still in
[0, 1], returned with every rule's value, since the RL stage logs each rule's pass rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

from data.errors import UserError
from data.forms import FORMS, clauses, form_share, regular_clauses
from tanggpt.cli import flag, flag_name
from tanggpt.metrics import acrostic_hits
from tanggpt.prosody import rhyme_hits, tonal_fits


def share(flags: list[bool]) -> float:
    """The share of true flags; 0.0 for none (an answer with nothing in it earns nothing)."""
    return sum(flags) / len(flags) if flags else 0.0


def stop_reward(stopped: bool) -> float:
    """1 if the answer ended with end-of-text within the length limit, else 0: an answer that
    runs to the limit never finishes its poem."""
    return 1.0 if stopped else 0.0


def regular_form_reward(poem: str) -> float:
    """How near the poem is to the nearest of the four forms (data.forms.form_share): 1.0 for
    any 絕句 or 律詩, less for each clause missing, extra or of the wrong length."""
    return max(form_share(poem, form) for form in FORMS)


def form_reward(poem: str, form: str) -> float:
    """How near the poem is to the form asked for (五言絕句, 七言絕句, 五言律詩 or 七言律詩):
    the form's clauses that have its length, over the form's clause count or the poem's,
    whichever is larger (data.forms.form_share)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; one of {', '.join(FORMS)}")
    return form_share(poem, form)


def acrostic_reward(poem: str, head: str) -> float:
    """The share of clauses opening with their head character (metrics.acrostic_hits), counted
    against len(head) or the poem's clauses, whichever is more: a clause missing or one too
    many costs its share, so 1.0 exactly when the poem follows the acrostic."""
    if not head:
        raise ValueError("an acrostic needs at least one head character")
    return acrostic_hits(poem, head) / max(len(head), len(clauses(poem)))


def rhyme_reward(poem: str, repeat_voids: bool = True) -> float:
    """The share of the even clauses after the first (the 4th, 6th, 8th) whose last character
    rhymes with the rhymes before it, by the Pingshui table, without repeating one of them
    (prosody.rhyme_hits). 0 for an answer that is not a 絕句 or 律詩: which clauses should
    rhyme is only defined for those.

    With `repeat_voids`, a rhyme character used twice (重韻) voids the whole rule. Counted
    clause by clause, a 律詩 that repeats one of its four rhymes keeps 2/3 of the credit, and
    repeating a rhyme is far easier than finding a new one in its group (the model has just
    written it): the policy learned to do it (docs/rl.md, the repeated rhyme character)."""
    lines = regular_clauses(poem)
    if not lines:
        return 0.0
    ends = [clause[-1] for clause in lines[1::2]]
    if repeat_voids and len(set(ends)) < len(ends):
        return 0.0
    return share(rhyme_hits(lines))


def distinct_rhymes_reward(poem: str) -> float:
    """The share of the even clauses' last characters (the rhyme positions) that are not one
    already used at an earlier rhyme position (重韻, rhyming 州 with 州). The rhyme rule already
    gives a repeat no credit; this rule makes it cost more than a miss, since a policy
    rewarded for rhyming learns to repeat anyway: a character it has just written is the
    easiest one of the group to write again (docs/rl.md). 0 for an answer that is not a 絕句
    or 律詩."""
    lines = regular_clauses(poem)
    ends = [clause[-1] for clause in lines[1::2]] if lines else []
    return share([end not in ends[:i] for i, end in enumerate(ends)])


def tonal_reward(poem: str) -> float:
    """The share of clauses keeping the tonal pattern (prosody.tonal_fits): alternating
    within, opposed within the couplet, linked across couplets. 0 for an answer that is
    not a 絕句 or 律詩."""
    lines = regular_clauses(poem)
    return share(tonal_fits(lines)) if lines else 0.0


def no_copy_reward(poem: str, prompt_input: str) -> float:
    """The share of the answer's clauses that are not a clause of the prompt's input: a
    continuation that writes the given couplet again, or a poem that opens with its title,
    has filled a clause without writing it."""
    given = set(clauses(prompt_input))
    return share([clause not in given for clause in clauses(poem)])


def no_repeat_reward(poem: str) -> float:
    """The share of clauses that do not repeat an earlier clause of the poem: a repeated
    clause fills a form, and keeps the tones, for nothing."""
    written = clauses(poem)
    return share([clause not in written[:i] for i, clause in enumerate(written)])


# The rules each task is judged by. Every task: stop, a regular shape, rhyme, tones, no copy
# of its input, no repeat. The form task adds the form asked for, the acrostic task its heads.
# A continuation's answer is the rest of the poem: its shape, rhyme and tones are judged on
# the whole poem (the given couplet, then the answer), so the answer must rhyme with the
# given rhyme; no copy and no repeat on the answer alone, so a copied given line counts once.
# The title task is not here: whether a title fits its poem is no rule's to judge.
COMMON_RULES = ("stop", "regular_form", "rhyme", "distinct_rhymes", "tonal", "no_copy", "no_repeat")
TASK_RULES = {"poem": COMMON_RULES, "form": COMMON_RULES + ("form",), "acrostic": COMMON_RULES + ("acrostic",),
              "continue": COMMON_RULES}


@dataclass
class RewardWeights:
    """Each rule's weight in a task's reward, as flags (--stop-weight, ...): a task's reward is
    the weighted mean of its rules; 0 leaves a rule out of the total (it is still logged). And
    one switch of how the rhyme rule counts (--repeat-voids-rhyme).

    Chosen by judgment, except where docs/rl.md measured them. The instruction's own demand
    (the form asked for, the acrostic) weighs twice the rest, so that an answer doing what was
    asked beats one that only rhymes; the tonal pattern weighs half, because its check is rough
    (the 2nd, 4th and 6th characters only) and real poems break it: 靜夜思 and 春曉 are
    old-style quatrains (古絕) that do not keep it. The distinct-rhymes rule weighs 1, so that a
    repeated rhyme character costs more than a miss: measured against 0, it cut the share of
    rhymes that repeat a character (docs/rl.md, the repeated rhyme).
    """

    stop_weight: float = flag(1.0, "weight of the stop rule in the reward: the answer ended with end-of-text")
    regular_form_weight: float = flag(1.0, "weight of the regular-form rule: the share of clauses a 絕句 or "
                                           "律詩 would have (5 or 7 characters, 4 or 8 clauses)")
    form_weight: float = flag(2.0, "weight of the form rule (form task): the share of clauses the form asked "
                                   "for has")
    acrostic_weight: float = flag(2.0, "weight of the acrostic rule (acrostic task): the share of clauses opening "
                                       "with their head character")
    rhyme_weight: float = flag(1.0, "weight of the rhyme rule: the share of even clauses rhyming with the first "
                                    "rhyme by the Pingshui table, no rhyme character repeated")
    distinct_rhymes_weight: float = flag(1.0, "weight of the distinct-rhymes rule: the share of rhyme positions not "
                                              "repeating an earlier rhyme character (a repeat then costs more than a "
                                              "miss)")
    tonal_weight: float = flag(0.5, "weight of the tonal rule: the share of clauses keeping the tonal pattern "
                                    "(a rough check that real old-style poems break)")
    no_copy_weight: float = flag(1.0, "weight of the no-copy rule: the share of clauses not copied from the "
                                      "prompt's input")
    no_repeat_weight: float = flag(1.0, "weight of the no-repeat rule: the share of clauses not repeating an "
                                        "earlier one")
    repeat_voids_rhyme: bool = flag(True, "a rhyme character used twice voids the whole rhyme rule (without it, "
                                          "a repeat costs only its own clause, and the policy learns to repeat)")

    def weight(self, rule: str) -> float:
        """The weight of a rule, by its name in TASK_RULES."""
        return getattr(self, f"{rule}_weight")

    def validate(self, tasks: Iterable[str] = tuple(TASK_RULES)) -> None:
        """No weight negative, and each of `tasks` (those the run asks) has a rule that weighs."""
        for f in fields(RewardWeights):
            if f.type in (bool, "bool"):
                continue
            if not getattr(self, f.name) >= 0:
                raise UserError(f"{flag_name(f.name)} must not be negative, got {getattr(self, f.name)}")
        for task in tasks:
            if not sum(self.weight(rule) for rule in TASK_RULES[task]):
                rules = ", ".join(flag_name(f"{rule}_weight") for rule in TASK_RULES[task])
                raise UserError(f"the {task} task's rules all weigh 0 ({rules}): its reward would be 0/0")


@dataclass(frozen=True)
class Reward:
    total: float  # the weighted mean of the rules, in [0, 1]: what the RL stage trains on
    rules: dict[str, float]  # every rule that applies to the task, by name (TASK_RULES), each in [0, 1]


def task_reward(task: str, answer: str, stopped: bool, request_input: str, form: str = "",
                weights: RewardWeights | None = None) -> Reward:
    """The reward of one answer to a request of `task` (poem, form, acrostic or continue,
    data/tasks.py) whose input was `request_input` (the title; for acrostic the heads; for
    continue the given couplet). `form` is the form the form task asked for; `stopped`,
    whether the answer ended with end-of-text."""
    if task not in TASK_RULES:
        raise ValueError(f"no rule judges the {task!r} task; one of {', '.join(TASK_RULES)}")
    if (task == "form") != bool(form):
        raise ValueError(f"the form task, and only it, is asked for a form; got task {task!r} and form {form!r}")
    weights = weights or RewardWeights()
    poem = f"{request_input}\n{answer}" if task == "continue" else answer
    rules = {"stop": stop_reward(stopped), "regular_form": regular_form_reward(poem), "rhyme": rhyme_reward(poem, weights.repeat_voids_rhyme),
             "distinct_rhymes": distinct_rhymes_reward(poem),
             "tonal": tonal_reward(poem), "no_copy": no_copy_reward(answer, request_input),
             "no_repeat": no_repeat_reward(answer)}
    if task == "form":
        rules["form"] = form_reward(poem, form)
    if task == "acrostic":
        rules["acrostic"] = acrostic_reward(poem, request_input)
    weight = sum(weights.weight(rule) for rule in rules)
    if not weight:
        raise ValueError(f"the {task} task's rules all weigh 0")
    return Reward(sum(weights.weight(rule) * value for rule, value in rules.items()) / weight, rules)
