"""Asking a model for poems: titles in, (poem, stopped) out.

Shared by finetune.py (the per-epoch gallery) and the evaluation: each title is wrapped in
the instruction prompt, all titles are generated as one batch with the KV cache, and
each answer runs until the end-of-text token or the length limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.corpus import instruction_prompt
from data.tokenizer import Tokenizer
from device import Runtime
from model import GPT


@dataclass
class Answer:
    title: str
    poem: str
    stopped: bool  # ended with <|endoftext|> within the limit


def answer_titles(
    model: GPT,
    tokenizer: Tokenizer,
    titles: list[str],
    runtime: Runtime,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 1337,
    batch_size: int = 64,
) -> list[Answer]:
    """Generate one poem per title, in batches, stopping each at end-of-text."""
    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    answers = []
    for start in range(0, len(titles), batch_size):
        chunk = titles[start : start + batch_size]
        prompts = [tokenizer.encode(instruction_prompt(t)) for t in chunk]
        with runtime.autocast():
            outputs = model.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     stop_ids=[tokenizer.eot_id], generator=generator)
        for title, ids in zip(chunk, outputs):
            stopped = bool(ids) and ids[-1] == tokenizer.eot_id
            answers.append(Answer(title, tokenizer.decode(ids[:-1] if stopped else ids), stopped))
    return answers


def format_answers(answers: list[Answer]) -> str:
    """The gallery: each title, its poem, and whether the model stopped by itself."""
    blocks = []
    for a in answers:
        ending = "[ended with <|endoftext|>]" if a.stopped else "[no end-of-text: cut at the length limit]"
        blocks.append(f"《{a.title}》\n{a.poem}\n{ending}")
    return "\n\n".join(blocks)
