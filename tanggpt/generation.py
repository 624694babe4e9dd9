"""Generation: asking a model for poems. The sampling flags, and requests in, (answer, stopped) out.

Shared by sample.py, evaluate.py and finetune.py (the per-epoch gallery): each request
(an instruction and its input; for a title, the book's instruction) is wrapped in the
instruction prompt, requests are generated in batches with the KV cache,
and each answer runs until the end-of-text token or the length limit. The sampling
itself (temperature, top-k, top-p, the KV cache) is GPT.generate's, in model.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from data.errors import UserError
from data.chat import render_ids
from data.conversations import prompt_in_format
from data.instruct import INSTRUCTION
from data.tokenizer import END, Tokenizer
from model import GPT
from tanggpt.checkpoint import load_checkpoint, model_and_tokenizer
from tanggpt.cli import RuntimeConfig, flag
from tanggpt.device import Runtime
from tanggpt.prosody import RhymeConstraint


SEEDS = (-2**63, 2**64 - 1)  # the seeds torch.Generator.manual_seed takes


@dataclass
class SamplingConfig(RuntimeConfig):
    """The sampling flags of sample.py and evaluate.py."""

    max_new_tokens: int = flag(200, "length limit of each poem, in tokens")
    temperature: float = flag(0.8, "sampling temperature: below 1 safer, above 1 wilder, 0 = greedy (always the "
                                   "most likely token)")
    top_k: int = flag(0, "sample from the k most likely tokens only (0 = no limit)")
    top_p: float = flag(1.0, "sample from the fewest tokens whose probabilities add up to p (1 = no limit)")
    seed: int = flag(1337, "random seed: the same seed gives the same poems")
    rhyme: bool = flag(False, "enforce the rhyme: at the end of each even line allow only characters of the poem's "
                              "rhyme group so far (Pingshui table, prosody.py; char tokenizer)")
    compile: bool = flag(False, "torch.compile the one-token decoding step (model.GPT.generate_stream): its first "
                                "call of each batch size compiles (tens of seconds on a CPU), and on the fp32 CPU "
                                "the steps then gained too little to pay for it (docs/speed.md)")

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must not be negative (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (1 = no limit), got {self.top_p}")
        if not SEEDS[0] <= self.seed <= SEEDS[1]:  # torch.Generator.manual_seed's range; past it, an overflow
            raise UserError(f"--seed must be between {SEEDS[0]} and {SEEDS[1]}, got {self.seed}")

    def generate_kwargs(self) -> dict[str, Any]:
        """temperature, top_k and top_p as GPT.generate takes them (None = no limit)."""
        return {"temperature": self.temperature, "top_k": self.top_k or None,
                "top_p": self.top_p if self.top_p < 1 else None, "compile": self.compile}

    def describe(self) -> str:
        return (f"temperature {self.temperature:g}, top-k {self.top_k or 'off'}, top-p "
                f"{self.top_p if self.top_p < 1 else 'off'}, at most {self.max_new_tokens} tokens, seed {self.seed}"
                + (", rhyme enforced" if self.rhyme else ""))

    def constraint(self, tokenizer: Tokenizer) -> RhymeConstraint | None:
        """What --rhyme asks of the sampler: GPT.generate's `allowed`, or None."""
        if not self.rhyme:
            return None
        try:
            return RhymeConstraint(tokenizer)
        except ValueError as e:
            raise UserError(str(e)) from None


def load_for_sampling(path: str, flag_name: str = "--ckpt", base: str = "", base_flag: str = "--base"
                      ) -> tuple[dict, GPT, Tokenizer]:
    """The checkpoint at `path`, its model (CPU, fp32, adapters merged) and its tokenizer, for
    sample.py and evaluate.py; checked as read (tanggpt/checkpoint.py: a file of another kind or
    version, a --base for a checkpoint without adapters, is one line naming the flag and file)."""
    ckpt = load_checkpoint(path, flag_name)
    model, tokenizer = model_and_tokenizer(ckpt, path, base, flag_name=flag_name, base_flag=base_flag)
    return ckpt, model, tokenizer


def for_generation(model: GPT, runtime: Runtime) -> GPT:
    """The model ready to sample: on the device, eval mode, weights in the runtime's
    precision (bf16 where the device has fast bf16). Casts in place; returns the model.

    Generating a token does little arithmetic per weight, and reads every weight once:
    at small batch sizes its speed is set by memory traffic, which bf16 weights halve.
    (Autocast would instead cast the fp32 weights again at every step.) Training keeps
    fp32 weights; losses are measured the way training measures them.
    """
    return model.to(device=runtime.device, dtype=runtime.dtype).eval()


@dataclass
class Answer:
    input: str  # for the poem task, the title
    response: str  # what the model wrote: a poem, or for the title task a title
    stopped: bool  # ended with <|endoftext|> within the limit
    instruction: str = INSTRUCTION

    @property
    def title(self) -> str:
        """The title a poem was written for (the input of the poem task)."""
        return self.input


def answer_requests(
    model: GPT,
    tokenizer: Tokenizer,
    requests: list[tuple[str, str]],
    runtime: Runtime,
    max_new_tokens: int = 200,
    chat: bool = False,
    **kwargs,
) -> list[Answer]:
    """Answer each (instruction, input) request, in batches, stopping each at end-of-text
    (generate_answers' other arguments). With `chat`, the model is a chat model (finetune.py
    --format chat): each request is asked as the user's turn of a conversation
    (data/conversations.chat_prompt_ids), and an answer ends at the <|end|> that closes the
    assistant's turn (or end-of-text)."""
    prompts = [prompt_in_format(tokenizer, instruction, input, chat) for instruction, input in requests]
    written = generate_answers(model, tokenizer, prompts, runtime, max_new_tokens, chat=chat, **kwargs)
    return [Answer(input, text, stopped, instruction) for (instruction, input), (text, stopped) in zip(requests, written)]


def answer_conversations(model: GPT, tokenizer: Tokenizer, conversations: list[list[dict[str, str]]],
                         runtime: Runtime, max_new_tokens: int = 200, **kwargs) -> list[tuple[str, bool]]:
    """A chat model's next assistant turn in each conversation (each ending with the user's
    turn), as (text, stopped at <|end|> or end-of-text); generate_answers' other arguments."""
    prompts = [render_ids(tokenizer, messages, add_generation_prompt=True) for messages in conversations]
    return generate_answers(model, tokenizer, prompts, runtime, max_new_tokens, chat=True, **kwargs)


def generate_answers(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    runtime: Runtime,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 1337,
    batch_size: int = 64,
    allowed: Callable | None = None,
    compile: bool = False,
    chat: bool = False,
) -> list[tuple[str, bool]]:
    """What the model writes after each prompt, in batches of batch_size with one seeded
    generator: (the text, whether it stopped by itself: at end-of-text, or with `chat` at <|end|>)."""
    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    stop_ids = [tokenizer.eot_id] + ([tokenizer.special_ids[END]] if chat else [])
    written = []
    for start in range(0, len(prompts), batch_size):
        with runtime.autocast():
            outputs = model.generate(prompts[start : start + batch_size], max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, allowed=allowed, compile=compile, stop_ids=stop_ids,
                                     generator=generator)
        for ids in outputs:
            stopped = bool(ids) and ids[-1] in stop_ids
            written.append((tokenizer.decode(ids[:-1] if stopped else ids), stopped))
    return written


def answer_titles(model: GPT, tokenizer: Tokenizer, titles: list[str], runtime: Runtime, max_new_tokens: int = 200,
                  **kwargs) -> list[Answer]:
    """One poem per title, asked with the book's instruction (answer_requests' other arguments)."""
    return answer_requests(model, tokenizer, [(INSTRUCTION, t) for t in titles], runtime, max_new_tokens, **kwargs)


def continue_text(model: GPT, tokenizer: Tokenizer, text: str, runtime: Runtime, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int | None = None, seed: int = 1337) -> str:
    """`text` and what the model writes after it, as raw text: how a base model is asked
    anything (pretrain.py's samples), with no instruction prompt and no stop."""
    prompt = tokenizer.encode(text)
    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    with runtime.autocast():
        (new,) = model.generate([prompt], max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(prompt + new)


def format_answers(answers: list[Answer], note: Callable[[str], str] | None = None, chat: bool = False) -> str:
    """The gallery: each title (or, for another instruction, the instruction and its input),
    the answer, whether the model stopped by itself (with `chat`, at the <|end|> of its turn),
    and the `note` on the poem, if given (align.py marks rhymes and tones with prosody.prosody_marks)."""
    stop, missing = (END, END) if chat else ("<|endoftext|>", "end-of-text")
    blocks = []
    for a in answers:
        ending = f"[ended with {stop}]" if a.stopped else f"[no {missing}: cut at the length limit]"
        if note is not None:
            ending += f" [{note(a.response)}]"
        asked = f"《{a.input}》" if a.instruction == INSTRUCTION else f"〔{a.instruction}〕\n{a.input}\n→"
        blocks.append(f"{asked}\n{a.response}\n{ending}")
    return "\n\n".join(blocks)
