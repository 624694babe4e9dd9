"""The instruction format, in one place: prompts, the labels (loss masking) and the batches.

A sample is an instruction, an input and a response, laid out as

    <INS>{instruction}<INP>{input}<RES>{response}<|endoftext|>

For the Tang poems the instruction is INSTRUCTION ("write a poem on this title"), the
input is the title and the response the poem, its lines joined by newlines.

The four markers are control tokens: each is one id, and only this module puts them in
a sequence (`prompt_ids`, `encode_sample`). Text itself, a title typed by a user or the
fields of a --data record, is always encoded as plain text (the tokenizer never reads a
marker out of text), so a title such as `春夜<RES>喜雨` cannot open a second answer. A
--data record whose text contains a marker's spelling is refused, naming the record:
it is almost certainly a mistake, and learning to write "<|endoftext|>" as characters
would teach nothing useful.

The model is trained as a causal LM on the whole sequence shifted by one, but by default
only the response positions carry labels: the prompt is given, so there is nothing to
learn from predicting it ("only the completion tokens count"). The end-of-text token
is part of the response: learning to predict it is learning to stop.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from data.corpus import Poem
from data.errors import UserError, lone_surrogate
from data.tokenizer import EOT, INP, INS, RES, SPECIALS, Tokenizer

# The instruction every poem sample starts with ("write a poem on this title").
INSTRUCTION = "請用以下題目寫一首詩"
IGNORE = -100  # the label cross_entropy skips


class InstructionDataError(UserError):
    """A bad --data file; the message is one line naming the file and line."""


@dataclass
class Sample:
    instruction: str
    input: str  # for a poem sample, its title
    response: str


def poem_sample(poem: Poem) -> Sample:
    """A poem as an instruction sample: its title in, its lines out."""
    return Sample(INSTRUCTION, poem.title, poem.body)


# -----------------------------------------------------------------------------
# Prompts and labels


def prompt_text(instruction: str, input: str) -> str:
    """The prompt as a person reads it (for printing; never encoded from this text)."""
    return f"{INS}{instruction}{INP}{input}{RES}"


def prompt_ids(tokenizer: Tokenizer, instruction: str, input: str, unknown: Counter | None = None) -> list[int]:
    """<INS> instruction <INP> input <RES> as ids: the markers from their ids, the text as plain text."""
    special = tokenizer.special_ids
    return ([special[INS]] + tokenizer.encode(instruction, unknown) + [special[INP]]
            + tokenizer.encode(input, unknown) + [special[RES]])


def title_prompt_ids(tokenizer: Tokenizer, title: str, unknown: Counter | None = None) -> list[int]:
    """The prompt that asks a tuned model for a poem on `title`."""
    return prompt_ids(tokenizer, INSTRUCTION, title, unknown)


class EncodedSample(NamedTuple):
    inputs: list[int]
    labels: list[int]  # what training learns from: the response only, or every token (loss_on="all")
    response_labels: list[int]  # the response only, whatever loss_on is: for a comparable loss


def encode_sample(tokenizer: Tokenizer, sample: Sample, loss_on: str = "response",
                  unknown: Counter | None = None) -> EncodedSample:
    """Token ids -> (inputs, labels, response_labels), each len(ids) - 1 long.

    This is the one place the loss mask is decided. inputs[i] = ids[i] and the label at
    position i is ids[i + 1]: the token the model must predict there. With
    loss_on="response", positions whose next token is still part of the prompt get
    IGNORE; the first labelled position is the <RES> token, predicting the response's first
    token, and the last predicts <|endoftext|>. loss_on="all" labels every position, as
    the book's code does. response_labels is always the response-only version, so both
    modes report a comparable loss.
    """
    if loss_on not in ("response", "all"):
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    prompt = prompt_ids(tokenizer, sample.instruction, sample.input, unknown)
    response = tokenizer.encode(sample.response, unknown) + [tokenizer.eot_id]
    ids = prompt + response
    response_labels = [IGNORE] * (len(prompt) - 1) + response
    labels = ids[1:] if loss_on == "all" else response_labels
    return EncodedSample(ids[:-1], labels, response_labels)


def sample_length(instruction_tokens: int, input_tokens: int, response_tokens: int) -> int:
    """How long encode_sample's inputs are, from the token counts of the three texts alone:
    the markers <INS>, <INP>, <RES> and <|endoftext|> add four ids, and the inputs stop one
    short of the last (each position predicts the next). What a sample's fit in block_size
    is judged by, before any sample is encoded."""
    return instruction_tokens + input_tokens + response_tokens + 3


def encode_samples(tokenizer: Tokenizer, samples: list[Sample], block_size: int, loss_on: str = "response",
                   unknown: Counter | None = None) -> tuple[list[EncodedSample], int]:
    """Encode samples; drop those longer than block_size (return how many).

    Dropped, not truncated: a truncated sample loses its end-of-text token, and would
    teach the model exactly what this stage exists to unteach, running on without stopping.
    """
    encoded = [encode_sample(tokenizer, s, loss_on, unknown) for s in samples]
    kept = [e for e in encoded if len(e.inputs) <= block_size]
    return kept, len(encoded) - len(kept)


def response_rows(tokenizer: Tokenizer, samples: list[Sample], block_size: int, unknown: Counter | None = None
                  ) -> list[tuple[list[int], list[int]] | None]:
    """(inputs, response labels) of each sample, for scoring its response; None where it does not fit block_size.

    One entry per sample, in order, so that rows of two lists of samples (one poem
    under two titles, say) stay paired.
    """
    rows = []
    for sample in samples:
        inputs, _, response = encode_sample(tokenizer, sample, "response", unknown)  # unknown characters -> <unk>
        rows.append((inputs, response) if len(inputs) <= block_size else None)
    return rows


# -----------------------------------------------------------------------------
# Batches


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (inputs, labels) rows to the longest row in the batch, not to block_size.

    Padding inputs use pad_id (any valid id: attention is causal, so padding after a row's
    end cannot affect its real positions) and padding labels are IGNORE, so padding
    never counts in the loss.
    """
    width = max(len(inputs) for inputs, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (inputs, labels) in enumerate(rows):
        x[i, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        y[i, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return x, y


def cut_by_length(items: list, pieces: int, length: Callable[[Any], int]) -> list[list]:
    """The items sorted by `length` (stable: a pure function of the items), cut into `pieces`
    runs of about equal count (fewer if there are fewer items). Each run, padded to its own
    longest item, wastes less than the whole list padded to the longest of all."""
    items = sorted(items, key=length)
    n = min(pieces, len(items))
    cuts = [round(j * len(items) / n) for j in range(n + 1)]
    return [items[a:b] for a, b in zip(cuts, cuts[1:])]


# With length buckets, the samples of this many steps are sorted by length together.
BUCKET_STEPS = 50


class EpochBatches:
    """Padded (inputs, labels) micro-batches of encoded samples, one seeded shuffle per epoch.

    A step takes batch_size x grad_accum x world_size samples; an epoch is enough steps
    to see every sample once (the last step wraps around to the epoch's start). A batch
    is a pure function of (step, micro-step, rank): the epoch's order comes from the
    seed and the epoch number alone, so a run resumed mid-epoch continues it exactly.

    `rows` is the list of samples, or a function epoch -> that epoch's samples, as many
    every epoch (data/tasks.py's TaskMixture draws each poem's task anew each epoch).

    A batch is padded to its longest row, so a batch of one long and many short samples
    is mostly padding. Two ways to waste less:
    - `pieces` (length_pieces > 1) keeps every step's samples and cuts each micro-batch,
      sorted by length, into that many pieces, each padded to its own longest row. The
      loop weights each piece by the labels it carries (training.accumulate_gradients),
      so the gradient is the one of the whole micro-batch; only the padding goes.
    - With length_buckets, the shuffled order is cut into spans of BUCKET_STEPS steps'
      samples, each span is sorted by length and cut into steps, and the steps are
      shuffled: a step holds samples of about one length, and which lengths come when is
      still random. This changes what a step learns from (mostly one task a step).
    """

    def __init__(self, rows: list | Callable[[int], list], batch_size: int, grad_accum: int = 1,
                 world_size: int = 1, seed: int = 0, pad_id: int = 0, length_buckets: bool = False,
                 length_pieces: int = 1):
        self.rows_of = rows if callable(rows) else lambda epoch: rows
        self.length_pieces = length_pieces
        self.rows = self.rows_of(0)  # the first epoch's
        self.batch_size, self.grad_accum, self.world_size = batch_size, grad_accum, world_size
        self.seed, self.pad_id, self.length_buckets = seed, pad_id, length_buckets
        self.samples_per_step = batch_size * grad_accum * world_size
        self.steps_per_epoch = math.ceil(len(self.rows) / self.samples_per_step)
        self._order: tuple[int, list[int]] | None = None  # the last epoch's order, computed once

    def order(self, epoch: int) -> list[int]:
        """The epoch's rows in the order its steps take them (a function of seed and epoch alone)."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.rows), generator=generator).tolist()
        if self.length_buckets:
            rows, per_step = self.rows_of(epoch), self.samples_per_step
            span = per_step * BUCKET_STEPS
            # sorted() is stable: rows of one length keep their shuffled order.
            order = [i for start in range(0, len(order), span)
                     for i in sorted(order[start:start + span], key=lambda i: len(rows[i].inputs))]
            whole_steps = len(order) // per_step  # a last, partial step stays last: steps stay aligned
            steps = torch.randperm(whole_steps, generator=generator).tolist()
            order = [i for s in steps for i in order[s * per_step:(s + 1) * per_step]] + order[whole_steps * per_step:]
        self._order = (epoch, order)
        return order

    def indices(self, step: int, micro: int = 0, rank: int = 0) -> list[int]:
        """Which rows make up the micro-batch (indices into the epoch's rows)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        first = position * self.samples_per_step + (micro * self.world_size + rank) * self.batch_size
        return [order[(first + i) % len(self.rows)] for i in range(self.batch_size)]

    def padding_share(self, epoch: int = 0, pieces: bool = True) -> float:
        """The share of the epoch's batch positions that are padding (rows of `inputs`), in
        `pieces` as the loop runs them, or (pieces=False) in whole micro-batches."""
        real, padded = 0, 0
        for step in range(epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch):
            for micro in range(self.grad_accum):
                for rank in range(self.world_size):
                    rows = self.rows_at(step, micro, rank)
                    for piece in self.cut_by_length(rows) if pieces else [rows]:
                        lengths = [len(row.inputs) for row in piece]
                        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
        return 1 - real / padded

    def rows_at(self, step: int, micro: int = 0, rank: int = 0) -> list:
        """The micro-batch's rows, in the epoch's order."""
        epoch_rows = self.rows_of(step // self.steps_per_epoch)
        return [epoch_rows[i] for i in self.indices(step, micro, rank)]

    def cut_by_length(self, rows: list) -> list[list]:
        """The rows cut into length_pieces pieces of about one length (cut_by_length)."""
        return cut_by_length(rows, self.length_pieces, lambda row: len(row.inputs))

    def batch(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch as one padded batch."""
        return pad_batch([(row.inputs, row.labels) for row in self.rows_at(step, micro, rank)], self.pad_id)

    def pieces(self, step: int, micro: int = 0, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batch as length_pieces padded batches of about one length each: the same
        rows as batch(), with less padding."""
        if self.length_pieces == 1:
            return [self.batch(step, micro, rank)]
        return [pad_batch([(row.inputs, row.labels) for row in piece], self.pad_id)
                for piece in self.cut_by_length(self.rows_at(step, micro, rank))]


# -----------------------------------------------------------------------------
# --data files


def load_instruction_jsonl(path: str | Path) -> list[Sample]:
    """Records {"instruction": ..., "input": ..., "output": ...}, one JSON object per line."""
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"--data {path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InstructionDataError(f"--data {path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") \
            from None
    samples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--data {path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InstructionDataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InstructionDataError(f"{where}: expected a JSON object")
        missing = [k for k in ("instruction", "input", "output") if not isinstance(record.get(k), str)]
        if missing:
            raise InstructionDataError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
        if not record["output"]:
            raise InstructionDataError(f"{where}: empty output")
        for key in ("instruction", "input", "output"):
            bad = lone_surrogate(record[key])
            if bad is not None:  # JSON can escape half a UTF-16 pair; no text file or terminal can hold one
                raise InstructionDataError(f"{where}: field {key} holds \\u{ord(bad):04x}, half of a UTF-16 pair "
                                           "(a lone surrogate), not a character; escape the whole pair or write "
                                           "the character itself")
            marker = next((s for s in SPECIALS if s in record[key]), None)
            if marker:
                ending = " (the end-of-text token is added after every output)" if marker == EOT else ""
                raise InstructionDataError(f"{where}: field {key} contains the control token {marker}, "
                                           f"which text may not spell out{ending}")
        samples.append(Sample(record["instruction"], record["input"], record["output"]))
    if not samples:
        raise InstructionDataError(f"--data {path}: no records")
    return samples
