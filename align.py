"""Preference tuning (DPO, 偏好對齊): teach the tuned model which of its own answers is better.

    python align.py --init ckpt_sft.pt                      # -> ckpt_dpo.pt (pairs cached in ckpt_dpo.pairs.json)
    python align.py --init ckpt_sft.pt --preference rhyme   # an objective DPO cannot teach: watch it fail
    python align.py --init ckpt_sft.pt --lora-rank 8 --out ckpt_dpo_lora.pt   # DPO through LoRA adapters
    python align.py --resume                                # continue the run saved at --out

Three stages, three lessons: pretraining teaches the language, instruction tuning the
format and when to stop, and preference tuning which of the answers the model can
already write is the better one. It works in two steps:

1. Pairs. The instruction-tuned model (--init) writes --samples-per-prompt answers for each
   of --prompts titles of the alignment split, poems no earlier stage trained on; the
   preference (preference.py, judged by the Pingshui table in prosody.py) makes one pair
   per prompt of a chosen and a rejected answer. Their log-probabilities under that same
   model, the frozen reference, are computed once and cached with the pairs.
2. DPO (losses.dpo_loss) on the shared training loop: the policy, a copy of the
   reference, learns to raise the chosen answer's log-probability relative to the
   reference more than the rejected one's, plus an anchor (--sft-weight) that keeps the
   chosen answers likely, so the distribution does not drift. With --lora-rank the policy
   is the reference plus adapters (lora.py), and the reference is the same network with
   its adapters switched off: no second copy of the weights.

Each evaluation logs, on held-out pairs (--val-share of the prompts): the DPO loss,
reward accuracy and margin, and the policy's chosen and rejected log-probabilities;
and the finetune-val response loss, which says whether the model still writes poems
the way it did. The gallery marks each poem's shape, rhyme and tones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from data.corpus import Poem, corpus_fingerprint, corpus_folder, load_corpus
from data.errors import UserError
from data.instruct import EpochBatches, pad_batch
from data.tasks import finetune_val_rows, tuning_poems
from data.tokenizer import Tokenizer
from model import GPT, SAMPLER
from tanggpt.atomic import check_output
from tanggpt.checkpoint import DPO, KINDS, check_same_inputs, input_fingerprint, refuse_chat_model
from tanggpt.cli import flag, resume_rule, run_cli
from tanggpt.device import Runtime
from tanggpt.distributed import barrier
from tanggpt.generation import answer_titles, for_generation, format_answers
from tanggpt.lora import adapters_disabled
from tanggpt.losses import (PreferenceBatch, labelled_logps, own_logps, preference_loss, response_loss,
                            rhyme_group_loss)
from tanggpt.preference import (PREFERENCES, Pair, build_pairs, fits, load_pairs, no_pairs_error, pair_batch,
                                pair_figures, reference_logprobs, save_pairs, split_pairs)
from tanggpt.prosody import RhymeConstraint, prosody_marks
from tanggpt.rule_targets import rhyme_rows
from tanggpt.training import LOOP_FIXED, Stage, finished, start_runtime, train
from tanggpt.tuning import (LORA_FIXED, MORE_EPOCHS, TuneConfig, describe_tuning, done_as_started,
                            fingerprint_of_init, model_to_tune, open_run, read_init_again, refuse_pretrained)


@dataclass
class AlignConfig(TuneConfig):
    init: str = flag("", "the instruction-tuned checkpoint to align (e.g. ckpt_sft.pt); not needed with --resume")
    out: str = flag("ckpt_dpo.pt", "checkpoint path; the log, loss plot and samples are written beside it")
    preference: str = flag("tonal", "which answer is better: tonal (shaped answers that keep the tonal pattern over "
                                    "those that break it), shape (絕句/律詩-shaped over not), rhyme (rhyme-enforced "
                                    "answers over free ones that do not rhyme), real (the title's real poem over the "
                                    "model's answer); see preference.py",
                           choices=list(PREFERENCES))
    prompts: int = flag(1024, "alignment-split titles to sample answers for (at most one pair each)")
    samples_per_prompt: int = flag(4, "answers sampled per title, to find a chosen and a rejected one among")
    pair_temperature: float = flag(0.8, "sampling temperature of those answers")
    pairs: str = flag("", "the pair cache (default: beside --out, e.g. ckpt_dpo.pairs.json); reused when built "
                          "from the same model and settings")
    val_share: float = flag(0.1, "share of the pairs held out to evaluate on")
    beta: float = flag(0.1, "DPO's beta: how strongly the policy is held to the reference (higher = closer)")
    sft_weight: float = flag(2.0, "weight of the anchor: the chosen answers' cross-entropy per token (0 = pure DPO)")
    rhyme_weight: float = flag(3.0, "weight of the rhyme loss on real rhyming poems of the alignment split: at each "
                                    "rhyme position, -log p(any character of the rhyme group); those poems get the "
                                    "anchor (--sft-weight) too (0 = off; char tokenizer)")
    rhyme_batch_size: int = flag(32, "real rhyming poems per micro-batch for the rhyme loss")
    epochs: int = flag(4, "passes over the training pairs")
    batch_size: int = flag(8, "pairs per micro-batch (each pair is two sequences)")
    lr: float = flag(5e-4, "peak learning rate (DPO alone moves far with 3e-5; the rhyme loss needs more)")
    min_lr: float = flag(5e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = flag(10, "steps of linear warmup")
    log_interval: int = flag(5, "write a train-loss record to the JSONL log every this many steps")

    def validate(self) -> None:
        super().validate()
        if self.prompts < 1 or self.samples_per_prompt < 2:
            raise UserError(f"--prompts must be positive and --samples-per-prompt at least 2 (a pair needs two "
                            f"answers), got {self.prompts} and {self.samples_per_prompt}")
        if self.pair_temperature <= 0:
            raise UserError(f"--pair-temperature must be positive (at 0 every answer to a title is the same), "
                            f"got {self.pair_temperature}")
        if not 0 < self.val_share < 1:
            raise UserError(f"--val-share must be in (0, 1), got {self.val_share}")
        if self.rhyme_weight < 0 or self.rhyme_batch_size < 1:
            raise UserError(f"--rhyme-weight must not be negative and --rhyme-batch-size must be positive, got "
                            f"{self.rhyme_weight} and {self.rhyme_batch_size}")
        if self.beta <= 0 or self.sft_weight < 0:
            raise UserError(f"--beta must be positive and --sft-weight not negative, got {self.beta} and "
                            f"{self.sft_weight}")

    def pairs_path(self) -> Path:
        return Path(self.pairs) if self.pairs else Path(f"{Path(self.out).with_suffix('')}.pairs.json")


# What --resume never changes: these decide the pairs, their order and the loss.
RESUME_FIXED = {*LOOP_FIXED, "init", "preference", "prompts", "samples_per_prompt",
                "pair_temperature", "pairs", "val_share", "beta", "sft_weight", "rhyme_weight", "rhyme_batch_size",
                *LORA_FIXED}


def pair_key(config: AlignConfig, init_fingerprint: str, tokenizer: Tokenizer, prompts: list[Poem],
             runtime: Runtime, sampler: str | None = SAMPLER) -> dict:
    """Everything the cached pairs depend on: a cache built under another key is not used.
    The model's weights and tokenizer, the prompts' titles and poems (the corpus), the
    settings that decide the sampling, and the way ids are drawn (model.SAMPLER; None for a
    run started before it was recorded, whose cache was drawn by torch.multinomial)."""
    return {"init_fingerprint": init_fingerprint, "sampler": sampler, "tokenizer": tokenizer.name,
            "tokenizer_fingerprint": input_fingerprint(tokenizer.to_dict()),
            "prompts_fingerprint": input_fingerprint([[p.title, p.body] for p in prompts]),
            "preference": config.preference, "prompts": config.prompts, "samples_per_prompt": config.samples_per_prompt,
            "pair_temperature": config.pair_temperature, "seed": config.seed, "precision": str(runtime.dtype)}


def obtain_pairs(config: AlignConfig, reference: Callable[[], GPT], tokenizer: Tokenizer, poems: list[Poem],
                 key: dict, runtime: Runtime, block_size: int) -> list[Pair]:
    """The cached pairs if they match `key`; otherwise sample them from the reference model
    (`reference()` gives it: the --init model), score them under it, and cache them. An
    explicitly named cache built under another key, or not usable, is refused (it may be
    another run's) unless --overwrite."""
    path = config.pairs_path()
    pairs, why_not = load_pairs(path, key)
    too_long = next((i for i, pair in enumerate(pairs or []) if not fits(tokenizer, pair, block_size)), None)
    if too_long is not None:  # an edited cache: the pairs this key builds always fit
        pairs, why_not = None, f"is not a pair cache for this model (pair {too_long} is longer than its block_size " \
                               f"{block_size})"
    if pairs is not None:
        print(f"pairs: {len(pairs):,} from {path} (built from the same model and settings)")
        return pairs
    if path.exists():
        if config.pairs and not config.overwrite:
            raise UserError(f"--pairs {path} {why_not}; give another --pairs, or --overwrite to rebuild it")
        print(f"note: the pair cache {path} {why_not}; rebuilding it")
    reference = reference()
    titles = [p.title for p in poems]
    writer = for_generation(copy.deepcopy(reference), runtime)  # a copy: the reference stays fp32 for scoring
    pairs, counts = build_pairs(writer, tokenizer, titles, config.preference, config.samples_per_prompt, runtime,
                                block_size, config.pair_temperature, config.seed,
                                real_poems=[p.body for p in poems])
    del writer
    found = len(pairs)
    pairs = [p for p in pairs if fits(tokenizer, p, block_size)]
    counts.pairs = len(pairs)
    too_long = found - len(pairs)
    print(f"pairs: {counts.summary()}" + (f" ({too_long:,} more dropped: longer than block_size {block_size})"
                                           if too_long else ""))
    if len(pairs) < 2:
        raise no_pairs_error(counts, config.preference, too_long, block_size)
    reference_logprobs(reference, tokenizer, pairs, runtime)
    save_pairs(path, key, pairs, counts)
    return pairs


class AlignBatch(NamedTuple):
    pairs: PreferenceBatch
    rhyme_inputs: torch.Tensor | None  # real rhyming poems (None with --rhyme-weight 0)
    rhyme_labels: torch.Tensor | None  # their rhyme sets at the rhyme positions
    poem_labels: torch.Tensor | None  # their response labels


class AlignStage(Stage):
    """Batches of training pairs (and, with --rhyme-weight, of real rhyming poems); the loss is
    DPO + the anchor (+ the rhyme loss); evaluated on held-out pairs and finetune-val;
    sampled on the gallery, each poem marked by the Pingshui table."""

    def __init__(self, config: AlignConfig, tokenizer: Tokenizer, runtime: Runtime, rank: int, pairs: EpochBatches,
                 val_pairs: list[Pair], finetune_val: list, gallery: list[str], rhymes: EpochBatches | None,
                 group_masks: torch.Tensor, checkpoint_extra: dict):
        self.config, self.tokenizer, self.runtime, self.rank = config, tokenizer, runtime, rank
        self.pairs, self.val_pairs, self.finetune_val, self.gallery = pairs, val_pairs, finetune_val, gallery
        self.rhymes, self.group_masks = rhymes, group_masks.to(runtime.device)
        self.saved_with = checkpoint_extra
        self.kind = DPO
        self.plot_title = (f"preference tuning (DPO, {config.preference}): train = DPO + {config.sft_weight:g} x "
                           f"anchor" + (f" + {config.rhyme_weight:g} x rhyme" if rhymes is not None else ""))
        self.plot_ylabel = "loss per pair"
        self.sample_before_training = True

    def get_batch(self, step: int, micro_step: int) -> AlignBatch:
        device, tokenizer = self.runtime.device, self.tokenizer
        train_pairs = self.pairs.rows
        pairs = pair_batch(tokenizer, [train_pairs[i] for i in self.pairs.indices(step, micro_step, self.rank)])
        pairs = PreferenceBatch(*(t.to(device) for t in pairs))
        if self.rhymes is None:
            return AlignBatch(pairs, None, None, None)
        rows = [self.rhymes.rows[i] for i in self.rhymes.indices(step, micro_step, self.rank)]
        x, rhyme_labels = pad_batch([(r.inputs, r.labels) for r in rows], tokenizer.eot_id)
        _, poem_labels = pad_batch([(r.inputs, r.response_labels) for r in rows], tokenizer.eot_id)
        return AlignBatch(pairs, x.to(device), rhyme_labels.to(device), poem_labels.to(device))

    def loss(self, model: torch.nn.Module, batch: AlignBatch) -> torch.Tensor:
        """DPO + the anchor on the pairs; with the rhyme loss, the real poems' rhyme loss, and
        the anchor on them too: a rhyme learned at the rhyme positions, the rest held in place."""
        config = self.config
        total = preference_loss(model, batch.pairs, config.beta, config.sft_weight)
        if batch.rhyme_inputs is not None:
            # The poems' response positions, scored once: the anchor reads the poem's own
            # characters there, the rhyme loss the rhyme groups at the rhyme positions among them.
            at, logps = labelled_logps(model, batch.rhyme_inputs, batch.poem_labels)
            poem_nll = -own_logps(logps, batch.poem_labels, at).mean()
            rhyme = rhyme_group_loss(logps, batch.rhyme_labels.flatten()[at], self.group_masks)
            total = total + config.rhyme_weight * rhyme + config.sft_weight * poem_nll
        return total

    def batch_weight(self, batch: AlignBatch) -> int:
        return len(batch.pairs.inputs) // 2  # a pair is the unit DPO averages over

    def batch_tokens(self, batch: AlignBatch) -> int:
        return batch.pairs.inputs.numel() + (0 if batch.rhyme_inputs is None else batch.rhyme_inputs.numel())

    def evaluate(self, model: GPT) -> dict:
        config, runtime = self.config, self.runtime
        held_out = pair_figures(model, self.tokenizer, self.val_pairs, config.beta, config.batch_size, runtime)
        seen = pair_figures(model, self.tokenizer, self.pairs.rows[:256], config.beta, config.batch_size, runtime)
        figures = {"eval_train_loss": seen["dpo_loss"], "val_loss": held_out["dpo_loss"],
                   **{k: v for k, v in held_out.items() if k != "dpo_loss"},
                   "finetune_val_loss": response_loss(model, self.finetune_val, self.tokenizer.eot_id,
                                                      2 * config.batch_size, runtime)}
        if self.rhymes is not None:  # the rhyme loss on (training) poems: exp(-loss) ~ the rhyme group's probability
            figures["rhyme_loss"] = self.rhyme_loss(model)
        return figures

    def rhyme_loss(self, model: GPT) -> float:
        was_training = model.training
        model.eval()
        x, y = pad_batch([(r.inputs, r.labels) for r in self.rhymes.rows[:256]], self.tokenizer.eot_id)
        x, y = x.to(self.runtime.device), y.to(self.runtime.device)
        with torch.no_grad(), self.runtime.autocast():
            at, logps = labelled_logps(model, x, y)  # the rhyme positions alone
            value = float(rhyme_group_loss(logps, y.flatten()[at], self.group_masks))
        model.train(was_training)
        return value

    def sample(self, model: GPT, step: int) -> str:
        answers = answer_titles(model, self.tokenizer, self.gallery, self.runtime, self.config.sample_tokens,
                                seed=self.config.seed)
        return format_answers(answers, note=prosody_marks)

    def describe_step(self, step: int) -> str:
        return f"step {step} (epoch {step / self.pairs.steps_per_epoch:.2g})"

    def checkpoint_extra(self) -> dict:
        return self.saved_with


def main(argv: list[str] | None = None) -> dict:
    return run_cli(run, AlignConfig, argv, __doc__.splitlines()[0], epilog=resume_rule(RESUME_FIXED))


def run(config: AlignConfig, explicit: set[str]) -> dict:
    ckpt, source, notes = open_run(config, explicit, DPO, RESUME_FIXED, init_example="ckpt_sft.pt",
                                   outputs={"--pairs": config.pairs_path()})
    refuse_pretrained(config, ckpt, source, "its answers give no pairs", "align that")
    refuse_chat_model(source, "--init", config.init, "align.py")
    dist_info, runtime = start_runtime(config)
    master = dist_info.is_master
    for note in notes if master else []:
        print(note)
    if master and ckpt is None and source["kind"] == DPO:
        print(f"note: --init {config.init} is already {KINDS[DPO]}; its answers are the new reference")

    check_output(config.pairs_path(), "--pairs", example=f"a file, such as {config.pairs_path() / 'pairs.json'}")
    model, tokenizer, adapters = model_to_tune(config, ckpt, source)
    if config.rhyme_weight or config.preference == "rhyme":  # before any sampling, not after it
        try:
            RhymeConstraint(tokenizer)
        except ValueError as e:
            flag = "--preference rhyme" if config.preference == "rhyme" else "--rhyme-weight"
            fix = "another --preference" if config.preference == "rhyme" else "--rhyme-weight 0"
            raise UserError(f"{flag}: {e}; give {fix}") from None
    # The reference is the --init model: the model itself before its first step, or the same
    # network with its adapters switched off (a LoRA run: pairs are built under
    # adapters_disabled), or, when a resumed full run must rebuild its pair cache, the --init
    # checkpoint read again.
    init_fingerprint = fingerprint_of_init(ckpt, model, adapters)
    model.to(runtime.device)
    block_size = model.config.block_size

    def reference() -> GPT:
        if ckpt is None or adapters:
            return model
        return read_init_again(config, init_fingerprint, f"rebuild the pair cache {config.pairs_path()}").to(
            runtime.device)

    if ckpt is not None and done_as_started(ckpt, explicit, config.out, master):
        return {}  # a finished run: said before any pair is read or sampled again
    splits = load_corpus(config.poems or None, verbose=master)
    inputs = {"--poems": corpus_fingerprint(corpus_folder(config.poems or None))}
    check_same_inputs(ckpt, inputs, config.out)
    prompts = splits["alignment"][: config.prompts]
    # A resumed run keeps the pairs it started with: its own sampler's cache (None: from before
    # the sampler was recorded) is still its cache; rebuilt, it would be drawn the new way.
    sampler = SAMPLER if ckpt is None else ckpt.get("sampler")
    key = pair_key(config, init_fingerprint, tokenizer, prompts, runtime, sampler)
    if master:  # one process samples the pairs and writes the cache; the others read it
        with adapters_disabled(model):
            pairs = obtain_pairs(config, reference, tokenizer, prompts, key, runtime, block_size)
    barrier(dist_info)
    if not master:
        pairs = load_pairs(config.pairs_path(), key)[0]
    train_pairs, val_pairs = split_pairs(pairs, config.val_share, config.seed)
    val_poems = tuning_poems(splits)[1]
    finetune_val = finetune_val_rows(tokenizer, splits, block_size)  # the val loss finetune.py reports
    gallery = config.gallery_titles([p.title for p in val_poems[:3]])

    batches = EpochBatches(train_pairs, config.batch_size, config.grad_accum, dist_info.world_size, config.seed)
    rhymes, group_masks = None, torch.zeros(0, 1, dtype=torch.bool)
    if config.rhyme_weight:
        rows, group_masks = rhyme_rows(tokenizer, splits["alignment"], block_size)
        if not rows:
            raise UserError("--rhyme-weight: no rhyming 絕句/律詩 in the alignment split fits the block; give "
                            "--rhyme-weight 0")
        rhymes = EpochBatches(rows, config.rhyme_batch_size, config.grad_accum, dist_info.world_size, config.seed,
                              pad_id=tokenizer.eot_id)
    max_iters = config.settle_schedule(batches.steps_per_epoch)
    if finished(ckpt, max_iters, config.out, MORE_EPOCHS, master):
        return {}
    stage = AlignStage(config, tokenizer, runtime, dist_info.rank, pairs=batches, val_pairs=val_pairs,
                       finetune_val=finetune_val, gallery=gallery, rhymes=rhymes, group_masks=group_masks,
                       checkpoint_extra={"init": config.init, "init_fingerprint": init_fingerprint,
                                         "preference": config.preference, "beta": config.beta, "inputs": inputs,
                                         "sampler": sampler, **adapters})
    if master:
        print(f"device {runtime.describe()}; model {model.num_params():,} parameters from "
              f"{config.out if config.resume else config.init}; preference {config.preference}, beta {config.beta:g}, "
              f"anchor weight {config.sft_weight:g}")
        print(describe_tuning(model, adapters))
        print(f"pairs: train {len(train_pairs):,}, held out {len(val_pairs):,}; {batches.samples_per_step} pairs per "
              f"step, {batches.steps_per_epoch} steps per epoch = {max_iters} steps")
        if rhymes is not None:
            print(f"rhyme loss: {len(rhymes.rows):,} rhyming poems of the alignment split, "
                  f"{rhymes.samples_per_step} per step, weight {config.rhyme_weight:g}")
    figures = train(model, config, stage, runtime, max_iters, ckpt, dist_info)
    if master and figures:
        print(f"done: held-out reward accuracy {figures['reward_accuracy']:.1%}, margin {figures['reward_margin']:.3f}, "
              f"finetune-val response loss {figures['finetune_val_loss']:.4f}; checkpoint {config.out}")
    return figures


if __name__ == "__main__":
    main()
