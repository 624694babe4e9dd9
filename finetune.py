"""Instruction tuning (指令微调): teach the pretrained model to follow an instruction and stop.

    python finetune.py --init ckpt.pt                  # tune the pretrained checkpoint -> ckpt_sft.pt
    python finetune.py --init ckpt.pt --tasks book     # the book's run: title -> poem, one sentence
    python finetune.py --init ckpt.pt --tasks poem,acrostic   # a mixture of some tasks
    python finetune.py --init ckpt.pt --loss-on all    # the book's variant: loss on the prompt too
    python finetune.py --init ckpt.pt --data my.jsonl  # add {"instruction","input","output"} records
    python finetune.py --init ckpt.pt --lora-rank 8 --out ckpt_sft_lora.pt   # LoRA: adapters on a frozen model
    python finetune.py --init ckpt.pt --format chat    # conversations in the chat template: ckpt_chat.pt
    python finetune.py --resume                        # continue the run saved at --out

Every finetune-train poem becomes one sample per epoch, of a task drawn for it that epoch
(data/tasks.py: title -> poem, form control, acrostic, continuation, titling a poem), e.g.

    <INS>請用以下題目寫一首詩<INP>{title}<RES>{poem lines joined by \\n}<|endoftext|>

and the model is trained on the response and the end-of-text token. With --format chat
it is tuned on conversations instead (data/conversations.py): the same tasks asked as the
user's turn, follow-ups on the answer before, system prompts, in the chat template of
data/chat.py, with the loss on every assistant turn or on the last (--loss-on). Before the first
epoch and after each one, it answers a fixed list of prompts, a few titles and one prompt
per other task: the gallery shows the base model rambling on without stopping, and the
tuned one answering and stopping.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from data.corpus import Poem, corpus_fingerprint, corpus_folder, load_corpus
from data.errors import UserError
from data.chat import LOSS_ON
from data.conversations import ConversationMixture, rows_in_format
from data.instruct import INSTRUCTION, EpochBatches, load_instruction_jsonl
from data.tasks import DEFAULT_TASKS, TaskMixture, finetune_val_rows, parse_tasks, task_instruction, tuning_poems
from data.tokenizer import Tokenizer
from model import GPT
from tanggpt.checkpoint import SFT, check_same_inputs, input_fingerprint
from tanggpt.cli import flag, require_positive, resume_rule, run_cli
from tanggpt.device import Runtime
from tanggpt.generation import answer_requests, format_answers
from tanggpt.losses import response_loss
from tanggpt.training import LOOP_FIXED, OPTIMIZER_HELP, Stage, finished, start_runtime, train
from tanggpt.tuning import (LORA_FIXED, MORE_EPOCHS, TuneConfig, describe_tuning, done_as_started, model_to_tune,
                            open_run)


# What each --loss-on puts the loss on, as the run's summary and plot say it.
LOSS_ON_WORDS = {"response": "response tokens", "all": "all tokens", "assistant": "every assistant turn",
                 "last": "the last assistant turn"}
CHAT_OUT = "ckpt_chat.pt"  # --out of a --format chat run, when not typed


@dataclass
class FinetuneConfig(TuneConfig):
    init: str = flag("", "the pretrained checkpoint to tune (e.g. ckpt.pt); not needed with --resume")
    out: str = flag("ckpt_sft.pt", "checkpoint path; the log, loss plot and samples are written beside it "
                                   f"(with --format chat and no --out: {CHAT_OUT})")
    lr: float = flag(0.0, "peak learning rate (0 = 1e-3 for a mixture of tasks, 3e-4 for --tasks book: new "
                          "skills to learn, or one format to adjust to)")
    min_lr: float = flag(0.0, "learning rate at the end of the cosine decay (0 = --lr / 10)")
    warmup_iters: int = flag(50, "steps of linear warmup")
    optimizer: str = flag("", OPTIMIZER_HELP + " (default: muon for a mixture of tasks, adamw for --tasks book)",
                          choices=["adamw", "muon"])
    format: str = flag("instruct", "instruct: the book's format, one request a sample (<INS>instruction<INP>input"
                                   "<RES>response); chat: conversations in the chat template, system, user and "
                                   "assistant turns (data/chat.py), the tokenizer gaining the chat markers",
                       choices=["instruct", "chat"])
    loss_on: str = flag("", "which tokens carry the loss. --format instruct: response (the poem and end-of-text, "
                            "the default) or all (every token); --format chat: assistant (every assistant turn, the "
                            "default) or last (the last turn only, the earlier replies as context)",
                        choices=["", "response", "all", "assistant", "last"])
    forms: str = flag("regular", "regular: tune on poems of regular form only (all clauses 5 or all 7 characters, "
                                 "paired); all: every poem", choices=["regular", "all"])
    tasks: str = flag(DEFAULT_TASKS, "the tasks to mix: all, book (title -> poem with the book's one sentence: the "
                             "single-task run), or a comma-separated list of poem, form, acrostic, continue, title, each "
                             "optionally with a weight (acrostic:3 is drawn 3 times as often as a task of weight 1)")
    data: str = flag("", "JSONL file of {\"instruction\", \"input\", \"output\"} records to tune on as well")
    data_mode: str = flag("mix", "mix: --data samples join the poem samples; replace: use --data alone",
                          choices=["mix", "replace"])
    length_buckets: bool = flag(False, "batch samples of about one length together (each 50 steps' samples sorted "
                                       "by length, the steps shuffled): far less padding and faster steps, but a "
                                       "step then holds mostly one task, and the acrostic was learned worse "
                                       "(docs/speed.md)")
    length_pieces: int = flag(4, "cut each micro-batch, sorted by length, into this many pieces, each padded to its "
                                 "own longest row: the same samples and gradient with less padding, faster steps "
                                 "(1 = one padded batch)")

    def fill_defaults(self) -> None:
        """--lr 0, --min-lr 0 and no --optimizer follow --tasks (see the flags' help)."""
        # The book's run adjusts the model to one format: the lower rate is enough, and keeps
        # `--tasks book` the run it always was. A mixture teaches skills the base model lacks
        # (copying an acrostic head, counting lines to a form): measured, 1e-3 learns them
        # faster and reaches a lower finetune-val loss in the same steps (docs/results.md).
        book = self.tasks.strip() == "book"
        lr, min_lr = (3e-4, 3e-5) if book else (1e-3, 1e-4)
        # Muon taught the mixture's skills far better in the same steps (form control, the
        # acrostic: docs/speed.md); the book's run keeps the AdamW it was measured with.
        self.optimizer = self.optimizer or ("adamw" if book else "muon")
        if self.lr == 0:
            self.lr = lr
        if self.min_lr == 0:
            self.min_lr = min_lr if self.lr == lr else self.lr / 10
        self.loss_on = self.loss_on or ("assistant" if self.format == "chat" else "response")

    def validate(self) -> None:
        require_positive(self, ("length_pieces",))
        parse_tasks(self.tasks)  # an unknown task fails before the corpus loads
        masks = {"instruct": ("response", "all"), "chat": LOSS_ON}[self.format]
        if self.loss_on not in masks:
            raise UserError(f"--loss-on {self.loss_on} is not a mask of --format {self.format}; give "
                            + " or ".join(masks))
        if self.format == "chat" and self.data:
            raise UserError("--data records are instruction-format samples: give them with --format instruct")
        if self.format == "chat" and self.lora_rank:
            raise UserError("--format chat tunes every weight: the chat markers' new rows do not fit on --lora-rank "
                            "adapters over a base that lacks them")
        super().validate()


# What --resume never changes: these decide the samples, their order and the loss, so another
# value would not continue the same run.
RESUME_FIXED = {*LOOP_FIXED, "init", "format", "loss_on", "forms", "tasks", "data", "data_mode", "length_buckets",
                "length_pieces", *LORA_FIXED}
# A run started before a flag existed was trained with the value it had then.
BEFORE_THE_FLAG = {"length_buckets": False, "format": "instruct", "length_pieces": 1}


def gallery_requests(config: FinetuneConfig, tasks: dict, val_poems: list[Poem]) -> list[tuple[str, str]]:
    """What the gallery asks at each evaluation: the titles (--sample-titles, or 春夜喜雨 and
    three finetune-val titles), then one prompt for each other task in the mixture."""
    titles = config.gallery_titles([p.title for p in val_poems[:3]])
    requests = [(INSTRUCTION, title) for title in titles]
    poem = val_poems[0]
    inputs = {"form": titles[0], "acrostic": "春夏秋冬", "continue": poem.lines[0], "title": poem.body}
    return requests + [(task_instruction(name, form="七言絕句"), inputs[name]) for name in tasks if name in inputs]


class FinetuneStage(Stage):
    """The mixture's rows in epochs; evaluated by the response loss on finetune-val (the book's
    title -> poem task, comparable between runs of any --tasks); sampled on the gallery."""

    def __init__(self, config: FinetuneConfig, tokenizer: Tokenizer, batches: EpochBatches,
                 val_rows: list[tuple[list[int], list[int]]], gallery: list[tuple[str, str]], runtime: Runtime,
                 rank: int, adapters: dict, inputs: dict[str, str]):
        self.config, self.tokenizer, self.batches, self.val_rows = config, tokenizer, batches, val_rows
        self.gallery, self.runtime, self.rank, self.adapters, self.inputs = gallery, runtime, rank, adapters, inputs
        self.train_rows = [(row.inputs, row.response_labels) for row in batches.rows[:512]]
        self.kind = SFT
        self.plot_title = f"instruction tuning: loss on {LOSS_ON_WORDS[config.loss_on]}, val on response tokens"
        self.sample_before_training = True
        self.max_val_loss = 2 * math.log(tokenizer.vocab_size)  # far worse than a uniform guess: diverged

    def get_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.batch(step, micro_step, self.rank)
        return x.to(self.runtime.device), y.to(self.runtime.device)

    def pieces(self, step: int, micro_step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device = self.runtime.device
        return [(x.to(device), y.to(device)) for x, y in self.batches.pieces(step, micro_step, self.rank)]

    def evaluate(self, model: GPT) -> dict:  # response_loss puts the model in eval mode and back
        pad_id, batch_size = self.batches.pad_id, self.config.batch_size
        return {"eval_train_loss": response_loss(model, self.train_rows, pad_id, batch_size, self.runtime),
                "val_loss": response_loss(model, self.val_rows, pad_id, batch_size, self.runtime)}

    def sample(self, model: GPT, step: int) -> str:
        answers = answer_requests(model, self.tokenizer, self.gallery, self.runtime, self.config.sample_tokens,
                                  seed=self.config.seed, chat=self.config.format == "chat")
        return format_answers(answers, chat=self.config.format == "chat")

    def describe_step(self, step: int) -> str:
        return f"epoch {step / self.batches.steps_per_epoch:g}"

    def checkpoint_extra(self) -> dict:
        return {"init": self.config.init, "format": self.config.format, "loss_on": self.config.loss_on,
                "inputs": self.inputs, **self.adapters}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(run, FinetuneConfig, argv, __doc__.splitlines()[0], epilog=resume_rule(RESUME_FIXED))


def run(config: FinetuneConfig, explicit: set[str]) -> dict:
    if config.format == "chat" and "out" not in explicit:  # a chat model is not the instruction-tuned one
        config.out = CHAT_OUT
    ckpt, source, notes = open_run(config, explicit, SFT, RESUME_FIXED, init_example="ckpt.pt",
                                   before_the_flag=BEFORE_THE_FLAG, inputs={"--data": config.data})
    extra = load_instruction_jsonl(config.data) if config.data else []  # a bad file fails before the corpus loads
    dist_info, runtime = start_runtime(config)
    master = dist_info.is_master
    for note in notes if master else []:
        print(note)
    if master and not config.resume and source["kind"] == SFT:
        # Allowed on purpose: tuning a tuned model again (say on your own --data) is a real use.
        print(f"note: --init {config.init} is already instruction-tuned; tuning it further")

    if ckpt is not None and done_as_started(ckpt, explicit, config.out, master):
        return {}
    chat = config.format == "chat"
    model, tokenizer, adapters = model_to_tune(config, ckpt, source, chat_markers=chat)
    model.to(runtime.device)
    block_size = model.config.block_size

    splits = load_corpus(config.poems or None, verbose=master)
    # What decides the samples besides the flags: a resumed run must read the same.
    inputs = {"--poems": corpus_fingerprint(corpus_folder(config.poems or None)),
              **({"--data": input_fingerprint([asdict(record) for record in extra])} if config.data else {})}
    check_same_inputs(ckpt, inputs, config.out)
    train_poems, val_poems = tuning_poems(splits, config.forms)
    unknown: Counter = Counter()
    if chat:
        mixture = ConversationMixture(train_poems, parse_tasks(config.tasks), tokenizer, block_size, config.loss_on,
                                      config.seed, unknown)
    else:
        mixture = TaskMixture([] if extra and config.data_mode == "replace" else train_poems,
                              parse_tasks(config.tasks), tokenizer, block_size, config.loss_on, config.seed, extra,
                              unknown)
    # The val loss is always the book's task, title -> poem: comparable between runs of any --tasks or --forms
    # (and, asked as one turn of a conversation, between the two formats).
    val_rows = finetune_val_rows(tokenizer, splits, block_size, unknown, rows_in_format(chat))
    dropped_val = len(tuning_poems(splits)[1]) - len(val_rows)
    poems_read = [] if extra and config.data_mode == "replace" else train_poems
    if not poems_read and not extra:
        raise UserError("the finetune-train split is empty (0 poems); use a larger --poems folder, or --data")
    if not len(mixture):  # say which records were dropped, and why
        read = ([f"{len(poems_read):,} poems of finetune-train"] if poems_read else []) + \
               ([f"{len(extra):,} --data records"] if extra else [])
        raise UserError(f"no training sample fits the model's block_size {block_size}: all {' and '.join(read)} are "
                        "longer" + ("; give shorter --data records" if extra else "; use a model with a larger block"))
    if not val_rows:
        raise UserError("the finetune-val split is empty; use a larger --poems folder")
    gallery = gallery_requests(config, mixture.tasks, val_poems)

    # Padding comes after each row's end and carries no label, so any id works as pad_id.
    batches = EpochBatches(mixture.rows, config.batch_size, config.grad_accum, dist_info.world_size, config.seed,
                           pad_id=tokenizer.eot_id, length_buckets=config.length_buckets,
                           length_pieces=config.length_pieces)
    steps_per_epoch, per_step = batches.steps_per_epoch, batches.samples_per_step
    max_iters = config.settle_schedule(steps_per_epoch)
    if finished(ckpt, max_iters, config.out, MORE_EPOCHS, master):
        return {}
    stage = FinetuneStage(config, tokenizer, batches, val_rows, gallery, runtime, dist_info.rank, adapters, inputs)
    if master:
        n_tokens = sum(len(row.inputs) for row in batches.rows)
        print(f"device {runtime.describe()}; model {model.num_params():,} parameters from "
              f"{config.out if config.resume else config.init}; tokenizer {tokenizer.name} ({tokenizer.vocab_size:,})")
        print(describe_tuning(model, adapters))
        print(f"samples: train {len(batches.rows):,} ({n_tokens:,} tokens in epoch 1), val {len(val_rows):,}; "
              f"forms {config.forms}; dropped {mixture.dropped + dropped_val} longer than block_size {block_size}")
        if chat:
            print(f"conversations, drawn anew each epoch, first requests of tasks {config.tasks}; epoch 1: "
                  + mixture.describe(0))
        else:
            counts = Counter(name for name, _ in mixture.draws(0))
            print(f"tasks {config.tasks}, drawn anew each epoch; epoch 1: "
                  + ", ".join(f"{name} {count:,}" for name, count in counts.most_common()))
        if unknown:
            print(f"{sum(unknown.values()):,} characters outside the vocabulary became <unk>: "
                  + "".join(c for c, _ in unknown.most_common(20)))
        print(f"batches: {batches.padding_share():.0%} of epoch 1's positions are padding"
              + (f", each batch cut by length into {config.length_pieces} pieces ("
                 f"{batches.padding_share(pieces=False):.0%} in whole batches)" if config.length_pieces > 1 else "")
              + (" (length buckets)" if config.length_buckets else " (no length buckets)"))
        print(f"loss on {LOSS_ON_WORDS[config.loss_on]}; {per_step} samples per step, {steps_per_epoch} steps per epoch, "
              f"{config.epochs} epochs" + (f", stopped at --max-iters {max_iters}" if config.max_iters else "")
              + f" = {max_iters} steps")
    figures = train(model, config, stage, runtime, max_iters, ckpt, dist_info)
    if master and figures:
        print(f"done: finetune-val response loss {figures['val_loss']:.4f}; checkpoint {config.out}")
    return figures


if __name__ == "__main__":
    main()
