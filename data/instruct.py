"""Instruction samples: the format, the labels (loss masking) and the padded batches.

A sample is a prompt and a response:

    <INS>請用以下題目寫一首詩<INP>{title}<RES>   +   {poem lines joined by \\n}<|endoftext|>

The model is trained as a causal LM on the whole sequence shifted by one, but by default
only the response positions carry labels: the prompt is given, so there is nothing to
learn from predicting it ("only the completion tokens count"). The end-of-text token
is part of the response: learning to predict it is learning to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data.corpus import Poem, instruction_prompt
from data.tokenizer import Tokenizer

IGNORE = -100  # the label cross_entropy skips


class InstructionDataError(Exception):
    """A bad --data file; the message is one line naming the file and line."""


@dataclass
class Sample:
    prompt: str
    response: str


def poem_sample(poem: Poem) -> Sample:
    return Sample(instruction_prompt(poem.title), poem.body)


def load_instruction_jsonl(path: str | Path) -> list[Sample]:
    """Records {"instruction": ..., "input": ..., "output": ...}, one JSON object per line."""
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"--data {path}: no such file")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InstructionDataError(f"--data {path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InstructionDataError(f"--data {path}:{number}: expected a JSON object")
        missing = [k for k in ("instruction", "input", "output") if not isinstance(record.get(k), str)]
        if missing:
            raise InstructionDataError(f"--data {path}:{number}: missing or non-string field(s) {', '.join(missing)}")
        if not record["output"]:
            raise InstructionDataError(f"--data {path}:{number}: empty output")
        samples.append(Sample(f"<INS>{record['instruction']}<INP>{record['input']}<RES>", record["output"]))
    if not samples:
        raise InstructionDataError(f"--data {path}: no records")
    return samples


def encode_sample(tokenizer: Tokenizer, sample: Sample, loss_on: str = "response", unknown=None
                  ) -> tuple[list[int], list[int], list[int]]:
    """Token ids -> (inputs, labels, response_labels), each len(ids) - 1 long.

    This is the one place the loss mask is decided. inputs[i] = ids[i] and the label at
    position i is ids[i + 1]: the token the model must predict there. With
    loss_on="response", positions whose next token is still part of the prompt get
    IGNORE; the first labelled position is the <RES> token, predicting the poem's first
    character, and the last predicts <|endoftext|>. loss_on="all" labels every
    position, as the book's code does. response_labels is always the response-only
    version, so both modes report a comparable loss.
    """
    if loss_on not in ("response", "all"):
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    prompt_ids = tokenizer.encode(sample.prompt, unknown)
    response_ids = tokenizer.encode(sample.response, unknown) + [tokenizer.eot_id]
    ids = prompt_ids + response_ids
    response_labels = [IGNORE] * (len(prompt_ids) - 1) + response_ids
    labels = ids[1:] if loss_on == "all" else response_labels
    return ids[:-1], labels, response_labels


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
