"""Reinforcement learning (强化学习, GRPO): the tuned model writes, the rules score, the better answers are reinforced.

    python rl.py --init ckpt_dpo.pt                  # -> ckpt_rl.pt
    python rl.py --init ckpt_sft.pt --tasks acrostic,form   # only some tasks
    python rl.py --init ckpt_dpo.pt --lora-rank 8 --out ckpt_rl_lora.pt   # through LoRA adapters
    python rl.py --resume                            # continue the run saved at --out

The fourth stage. Instruction tuning showed the model poems to imitate; DPO, pairs of its
own answers ranked. Here the model learns from a score: every rule of a regular poem can be
checked by a program (tanggpt/rewards.py: it stopped, has the form asked for, its acrostic
heads, rhymes by the Pingshui table with no rhyme character repeated, keeps its tones,
copies nothing and repeats nothing), so the reward needs no labels and no reward model.

Each step (GRPO, Shao et al. 2024; tanggpt/losses.py):
1. Requests: --batch-size prompts of the alignment split (poems no earlier stage trained
   on), each a task the rules judge (title -> poem, a form, an acrostic, a continuation),
   asked with one of the training phrasings (tanggpt/rollouts.py).
2. Rollouts: the policy, as it is at this step, answers each prompt --group-size times
   (batched, with the KV cache); the rules score every answer.
3. Advantages: each answer's reward minus its group's mean: better than its siblings,
   reinforced; worse, discouraged; a group all alike teaches nothing. An answer to a title
   or a continuation is compared with its siblings of the same shape only (--same-shape).
4. One update on the policy-gradient loss of those very answers, token by token, with an
   optional KL penalty (--kl-weight) that holds the policy near the --init model; and where
   a rule names what to write (an acrostic head, a rhyme group), the probability of what it
   allows raised on the policy's own answer (--target-weight; tanggpt/rule_targets.py).

Before the first step and at each evaluation, it answers held-out requests (unseen
finetune-val poems; the training phrasings and the held-out one, --group-size times each)
and logs the mean reward, every rule's pass rate (the share of answers keeping it fully), the stop rate, distinct-2, the KL
to --init and the entropy of the policy on its answers, and the share of groups whose
answers all scored the same; and the finetune-val response loss, which says whether the
model still writes poems the way it did.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import torch

from data.corpus import corpus_fingerprint, corpus_folder, load_corpus
from data.errors import UserError
from data.instruct import IGNORE, EpochBatches, cut_by_length, pad_batch
from data.tasks import finetune_val_rows, tuning_poems
from data.tokenizer import CharTokenizer, Tokenizer
from model import GPT
from tanggpt.checkpoint import KINDS, RL, check_same_inputs, refuse_chat_model
from tanggpt.cli import flag, require_positive, resume_rule, run_cli
from tanggpt.device import Runtime
from tanggpt.generation import answer_requests, format_answers
from tanggpt.lora import adapters_disabled
from tanggpt.losses import RolloutBatch, group_advantages, grpo_loss, response_loss, token_logprobs
from tanggpt.metrics import distinct_n
from tanggpt.prosody import RhymeConstraint, prosody_marks
from tanggpt.rewards import TASK_RULES, RewardWeights
from tanggpt.rollouts import (RL_TASKS, Request, Rollout, fitting, make_requests, parse_rl_tasks, roll_out,
                              rollout_rows, rollout_target_rows)
from tanggpt.training import LOOP_FIXED, Stage, start_runtime, train
from tanggpt.tuning import (LORA_FIXED, TuneConfig, describe_tuning, done_as_started, fingerprint_of_init,
                            model_to_tune, open_run, read_init_again, refuse_pretrained)


@dataclass
class RLConfig(TuneConfig, RewardWeights):
    init: str = flag("", "the tuned checkpoint to train (e.g. ckpt_dpo.pt or ckpt_sft.pt); not needed with --resume")
    out: str = flag("ckpt_rl.pt", "checkpoint path; the log, loss plot and samples are written beside it")
    tasks: str = flag("all", "the tasks to ask: all, or a comma-separated list of " + ", ".join(RL_TASKS) +
                               ", each optionally with a weight (acrostic:2 is asked twice as often)")
    group_size: int = flag(8, "answers sampled per prompt: the group each answer's reward is compared with")
    batch_size: int = flag(8, "prompts per micro-batch (each answered --group-size times)")
    max_new_tokens: int = flag(80, "length limit of each answer, in tokens (a prompt must leave this much of the "
                                   "block free)")
    temperature: float = flag(1.0, "sampling temperature of the answers (1 samples the policy itself, as the "
                                   "loss assumes)")
    kl_weight: float = flag(0.02, "weight of the KL penalty to the --init model (0 = none, and no reference model)")
    target_weight: float = flag(1.0, "where a rule names what to write (an acrostic head, a rhyme group), also raise "
                                     "the probability of what it allows, in the policy's own answers: such a place weighs "
                                     "like one more answer token of this advantage (0 = GRPO alone; 1 rhymed far more "
                                     "than 0, 3 no more than 1: docs/rl.md)")
    same_shape: bool = flag(True, "compare an answer to a title or a continuation only with its group's answers of "
                                  "the same shape (4 or 8 clauses): the reward then judges how a poem is written, not "
                                  "which length it chose (without it the policy learns to write quatrains, with fewer "
                                  "rhymes to get right; docs/rl.md)")
    eval_prompts: int = flag(32, "held-out prompts per evaluation, with the training phrasings and again with "
                                 "the held-out one, each answered --group-size times")
    epochs: int = flag(1, "passes over the alignment split's prompts (cut by --max-iters)")
    max_iters: int = flag(300, "stop after this many steps (0 = run all --epochs)")
    eval_interval: int = flag(50, "evaluate, sample and checkpoint every this many steps (0 = once per epoch)")
    lr: float = flag(3e-4, "peak learning rate (1e-4 moved the policy too little: KL to --init near 0.02 nats a token; "
                           "3e-4 reached the form control asked for, docs/rl.md)")
    min_lr: float = flag(3e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = flag(10, "steps of linear warmup")
    weight_decay: float = flag(0.0, "AdamW weight decay (0: the policy should move only where the reward says)")
    log_interval: int = flag(5, "write a train-loss record to the JSONL log every this many steps")
    length_pieces: int = flag(4, "cut each micro-batch's answers, sorted by length, into this many pieces, each "
                                 "padded to its own longest row: the same gradient with less padding, faster steps "
                                 "(1 = one padded batch)")

    def validate(self) -> None:
        super().validate()
        require_positive(self, ("length_pieces",))
        RewardWeights.validate(self, parse_rl_tasks(self.tasks))
        if self.group_size < 2:
            raise UserError(f"--group-size must be at least 2 (an answer is compared with its group), "
                            f"got {self.group_size}")
        if self.max_new_tokens < 1 or self.eval_prompts < 1:
            raise UserError(f"--max-new-tokens and --eval-prompts must be positive, got {self.max_new_tokens} and "
                            f"{self.eval_prompts}")
        if self.temperature <= 0 or self.kl_weight < 0:
            raise UserError(f"--temperature must be positive and --kl-weight not negative, got {self.temperature:g} "
                            f"and {self.kl_weight:g}")
        if self.target_weight < 0:
            raise UserError(f"--target-weight must not be negative, got {self.target_weight:g}")


# What --resume never changes: these decide the prompts, the answers and the loss.
RESUME_FIXED = {*LOOP_FIXED, "init", "tasks", "group_size", "max_new_tokens", "temperature", "kl_weight",
                "target_weight", "same_shape", "repeat_voids_rhyme", "length_pieces",
                *(f"{rule}_weight" for rule in {r for rules in TASK_RULES.values() for r in rules}), *LORA_FIXED}
# A run started before a flag existed was trained with the value it had then.
BEFORE_THE_FLAG = {"same_shape": False, "repeat_voids_rhyme": False, "distinct_rhymes_weight": 0.0,
                   "target_weight": 0.0, "length_pieces": 1}


class RLStage(Stage):
    """Batches of rollouts sampled from the policy at each step (their advantages and the
    reference's log-probabilities with them); the loss is GRPO's; evaluated on held-out
    requests and finetune-val; sampled on a gallery marked by the Pingshui table."""

    def __init__(self, config: RLConfig, model: GPT, reference: GPT | None, tokenizer: Tokenizer, runtime: Runtime,
                 rank: int, prompts: EpochBatches, eval_requests: dict[str, list[Request]], finetune_val: list,
                 gallery: list[Request], checkpoint_extra: dict):
        self.config, self.model, self.reference, self.tokenizer = config, model, reference, tokenizer
        self.runtime, self.rank, self.prompts, self.eval_requests = runtime, rank, prompts, eval_requests
        self.finetune_val, self.gallery, self.saved_with = finetune_val, gallery, checkpoint_extra
        self.kind = RL
        self.plot_title = f"reinforcement learning (GRPO, {config.group_size} answers a prompt): policy-gradient loss"
        self.plot_ylabel = "loss per answer token"
        self.sample_before_training = True
        self.evaluate_before_training = True  # the --init model's rewards: what the run is measured against
        self.max_val_loss = 2 * math.log(tokenizer.vocab_size)  # far worse than a uniform guess: diverged
        self.constraint = RhymeConstraint(tokenizer) if config.target_weight else None  # the rhyme groups' ids

    def rollouts(self, requests: list[Request], seed: int) -> list[Rollout]:
        generator = torch.Generator(device=self.runtime.device).manual_seed(seed)
        config = self.config
        return roll_out(self.model, self.tokenizer, requests, config.group_size, self.runtime, config.max_new_tokens,
                        config.temperature, generator, weights=config, batch_size=64)

    def reference_logps(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The --init model's log-probability of each label: the frozen copy, or (LoRA) the policy
        with its adapters switched off; zeros without a KL penalty."""
        if not self.config.kl_weight:
            return torch.zeros(labels.shape, device=labels.device)
        rows = 16  # at a time: a row's scores over the vocabulary are large
        with torch.no_grad(), self.runtime.autocast(), adapters_disabled(self.model):
            reference = self.reference if self.reference is not None else self.model
            return torch.cat([token_logprobs(reference, inputs[i : i + rows], labels[i : i + rows])
                              for i in range(0, len(inputs), rows)])

    def get_batch(self, step: int, micro_step: int) -> RolloutBatch:
        """The micro-batch's rollouts as one padded batch."""
        return self.rollout_batches(step, micro_step, pieces=1)[0]

    def pieces(self, step: int, micro_step: int) -> list[RolloutBatch]:
        """The micro-batch's rollouts cut by length into --length-pieces batches."""
        return self.rollout_batches(step, micro_step, self.config.length_pieces)

    def rollout_batches(self, step: int, micro_step: int, pieces: int) -> list[RolloutBatch]:
        """The answers of the policy as it is at `step` (its weights are part of what a resumed run
        restores), sampled with a generator seeded by the step: the same batch on resume.

        The advantages are computed over whole groups first; then the rows, sorted by length,
        are cut into `pieces` batches, each padded to its own longest row. grpo_loss is a mean
        over answer tokens and the loop weighs each piece by its answer tokens, so the gradient
        is the whole micro-batch's (tests/test_rl.py); the padding, a third of a whole batch's
        positions, is not run through the model.
        """
        requests = [self.prompts.rows[i] for i in self.prompts.indices(step, micro_step, self.rank)]
        seed = self.config.seed * 1_000_003 + (step * self.config.grad_accum + micro_step) * 997 + self.rank
        rollouts = self.rollouts(requests, seed)
        rewards = torch.tensor([r.reward.total for r in rollouts])
        shapes = torch.tensor([r.shape for r in rollouts]) if self.config.same_shape else None
        advantages = group_advantages(rewards, self.config.group_size, shapes)
        rows = rollout_rows(self.tokenizer, rollouts)
        target_rows, masks = (rollout_target_rows(self.tokenizer, rollouts, self.constraint)
                              if self.config.target_weight else (None, None))
        device = self.runtime.device
        masks = masks.to(device) if masks is not None else None
        batches = []
        was_training = self.model.training
        self.model.eval()  # the reference's log-probabilities (LoRA: this model, adapters off)
        for piece in cut_by_length(list(range(len(rows))), pieces, lambda i: len(rows[i][0])):
            inputs, labels = pad_batch([rows[i] for i in piece], self.tokenizer.eot_id)
            inputs, labels = inputs.to(device), labels.to(device)
            batch = RolloutBatch(inputs, labels, advantages[piece].to(device), self.reference_logps(inputs, labels))
            if target_rows is not None:
                _, targets = pad_batch([(rows[i][0], target_rows[i]) for i in piece], self.tokenizer.eot_id)
                batch = batch._replace(target_labels=targets.to(device), target_masks=masks)
            batches.append(batch)
        self.model.train(was_training)
        return batches

    def loss(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        return grpo_loss(model, batch, self.config.kl_weight, self.config.target_weight)

    def evaluate(self, model: GPT) -> dict:
        config = self.config
        figures = {"val_loss": response_loss(model, self.finetune_val, self.tokenizer.eot_id, 2 * config.batch_size,
                                             self.runtime)}
        was_training = model.training
        model.eval()
        for kind, requests in self.eval_requests.items():
            rollouts = self.rollouts(requests, config.seed)
            figures.update({f"{kind} {name}": value for name, value in rollout_figures(rollouts, config.group_size)
                            .items()})
            inputs, labels = pad_batch(rollout_rows(self.tokenizer, rollouts), self.tokenizer.eot_id)
            inputs, labels = inputs.to(self.runtime.device), labels.to(self.runtime.device)
            figures.update({f"{kind} {name}": value for name, value in
                            policy_figures(model, inputs, labels, self.reference_logps(inputs, labels),
                                           self.runtime, bool(config.kl_weight)).items()})
        model.train(was_training)
        return figures

    def sample(self, model: GPT, step: int) -> str:
        answers = answer_requests(model, self.tokenizer, [(r.instruction, r.input) for r in self.gallery],
                                  self.runtime, self.config.sample_tokens, seed=self.config.seed)
        return format_answers(answers, note=prosody_marks)

    def checkpoint_extra(self) -> dict:
        return self.saved_with


def rollout_figures(rollouts: list[Rollout], group_size: int) -> dict[str, float]:
    """Mean reward, each rule's pass rate (the share of answers keeping it fully, among those of
    a task it judges), the stop rate, distinct-2, and the share of groups all alike."""
    figures = {"reward": sum(r.reward.total for r in rollouts) / len(rollouts),
               "stop": sum(r.stopped for r in rollouts) / len(rollouts),
               "distinct_2": distinct_n([r.text for r in rollouts], 2)}
    kept, judged = Counter(), Counter()
    for rollout in rollouts:
        for rule, value in rollout.reward.rules.items():
            judged[rule] += 1
            kept[rule] += value == 1.0
    figures.update({f"pass {rule}": kept[rule] / judged[rule] for rule in judged})
    totals = [r.reward.total for r in rollouts]
    groups = [totals[i : i + group_size] for i in range(0, len(totals), group_size)]
    figures["alike_groups"] = sum(max(g) - min(g) < 1e-9 for g in groups) / len(groups)
    return figures


@torch.no_grad()
def policy_figures(model: GPT, inputs: torch.Tensor, labels: torch.Tensor, reference_logps: torch.Tensor,
                   runtime: Runtime, with_kl: bool, rows: int = 16) -> dict[str, float]:
    """Per answer token, on the policy's own answers: its entropy (how much it still hesitates)
    and, with a reference, the KL to it (the mean of log pi - log pi_ref, an unbiased estimate
    on samples of pi). `rows` at a time: a row's scores over the vocabulary are large."""
    entropy, kl, tokens = 0.0, 0.0, 0
    for start in range(0, len(inputs), rows):
        x, y = inputs[start : start + rows], labels[start : start + rows]
        with runtime.autocast():
            logits, _ = model(x)
        logps = torch.log_softmax(logits.float(), dim=-1)
        mask = y != IGNORE
        entropy += float(-(logps.exp() * logps).sum(-1)[mask].sum())
        own = logps.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        kl += float((own - reference_logps[start : start + rows])[mask].sum())
        tokens += int(mask.sum())
    return {"entropy": entropy / tokens, **({"kl": kl / tokens} if with_kl else {})}


class Prepared(NamedTuple):
    prompts: list[Request]
    eval_requests: dict[str, list[Request]]
    gallery: list[Request]


def prepare_requests(config: RLConfig, splits: dict, tokenizer: Tokenizer, block_size: int) -> Prepared:
    """The training prompts (alignment split), the held-out ones (finetune-val, seen and held-out
    phrasings) and the gallery's (one per task), each leaving --max-new-tokens of the block."""
    tasks = parse_rl_tasks(config.tasks)
    room = config.max_new_tokens
    prompts = fitting(make_requests(splits["alignment"], tasks, config.seed), tokenizer, block_size, room)
    val_poems = tuning_poems(splits)[1]
    evenly = dict.fromkeys(tasks, 1.0)  # evaluation asks every task alike, whatever the training weights
    eval_requests = {kind: fitting(make_requests(val_poems, evenly, config.seed + 1, held_out=kind == "held_out"),
                                   tokenizer, block_size, room)[: config.eval_prompts]
                     for kind in ("seen", "held_out")}
    if not prompts or not all(eval_requests.values()):
        raise UserError(f"no prompt leaves --max-new-tokens {room} of the model's block_size {block_size} free; give a "
                        "smaller --max-new-tokens")
    gallery = [next(r for r in eval_requests["seen"][::-1] + prompts if r.task == task) for task in tasks]
    return Prepared(prompts, eval_requests, gallery)


def main(argv: list[str] | None = None) -> dict:
    return run_cli(run, RLConfig, argv, __doc__.splitlines()[0], epilog=resume_rule(RESUME_FIXED))


def run(config: RLConfig, explicit: set[str]) -> dict:
    ckpt, source, notes = open_run(config, explicit, RL, RESUME_FIXED, init_example="ckpt_dpo.pt",
                                   before_the_flag=BEFORE_THE_FLAG)
    refuse_pretrained(config, ckpt, source, "no rule could score its answers", "train that")
    refuse_chat_model(source, "--init", config.init, "rl.py")
    dist_info, runtime = start_runtime(config)
    master = dist_info.is_master
    for note in notes if master else []:
        print(note)
    if master and ckpt is None and source["kind"] == RL:
        print(f"note: --init {config.init} is already {KINDS[RL]}; training it further")
    if ckpt is not None and done_as_started(ckpt, explicit, config.out, master):
        return {}

    model, tokenizer, adapters = model_to_tune(config, ckpt, source)
    if config.target_weight and not isinstance(tokenizer, CharTokenizer):
        if "target_weight" in explicit:
            raise UserError(f"--target-weight needs the char tokenizer (one id, one character), not {tokenizer.name}; "
                            "give --target-weight 0")
        config.target_weight = 0.0  # the default asks for targets only where a character is one id
        if master:
            print(f"note: the {tokenizer.name} tokenizer has no one-character ids: no rule targets (--target-weight 0)")
    init_fingerprint = fingerprint_of_init(ckpt, model, adapters)
    # The KL's reference is --init: with LoRA, the policy with its adapters off; otherwise a
    # frozen copy, of the model as it starts, or read again when a run resumes.
    reference = None
    if config.kl_weight and not adapters:
        reference = copy.deepcopy(model) if ckpt is None else read_init_again(config, init_fingerprint,
                                                                               "hold the policy near it (--kl-weight)")
        reference.requires_grad_(False).eval().to(runtime.device)
    model.to(runtime.device)
    block_size = model.config.block_size

    splits = load_corpus(config.poems or None, verbose=master)
    inputs = {"--poems": corpus_fingerprint(corpus_folder(config.poems or None))}
    check_same_inputs(ckpt, inputs, config.out)
    prepared = prepare_requests(config, splits, tokenizer, block_size)
    finetune_val = finetune_val_rows(tokenizer, splits, block_size)  # the val loss finetune.py reports
    batches = EpochBatches(prepared.prompts, config.batch_size, config.grad_accum, dist_info.world_size, config.seed)
    max_iters = config.settle_schedule(batches.steps_per_epoch)
    stage = RLStage(config, model, reference, tokenizer, runtime, dist_info.rank, batches, prepared.eval_requests,
                    finetune_val, prepared.gallery,
                    checkpoint_extra={"init": config.init, "init_fingerprint": init_fingerprint, "inputs": inputs,
                                      **adapters})
    if master:
        tasks = Counter(r.task for r in prepared.prompts)
        print(f"device {runtime.describe()}; model {model.num_params():,} parameters from "
              f"{config.out if config.resume else config.init}; tokenizer {tokenizer.name} ({tokenizer.vocab_size:,})")
        print(describe_tuning(model, adapters))
        print(f"prompts: {len(prepared.prompts):,} of the alignment split ("
              + ", ".join(f"{task} {n:,}" for task, n in tasks.most_common()) + f"); held out: "
              f"{len(prepared.eval_requests['seen'])} with the training phrasings, "
              f"{len(prepared.eval_requests['held_out'])} with the held-out one")
        print(f"{batches.samples_per_step} prompts x {config.group_size} answers per step, {max_iters} steps; "
              f"KL weight {config.kl_weight:g}" + (" (reference: the adapters off)" if adapters and config.kl_weight
                                                   else ""))
    figures = train(model, config, stage, runtime, max_iters, ckpt, dist_info)
    if master and figures:
        print(f"done: held-out reward {figures['held_out reward']:.3f} (seen phrasings {figures['seen reward']:.3f}), "
              f"finetune-val response loss {figures['val_loss']:.4f}; checkpoint {config.out}")
    return figures


if __name__ == "__main__":
    main()
