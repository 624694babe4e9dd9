"""Write poems with a trained checkpoint, streaming each one as it is generated.

    python sample.py --ckpt ckpt_sft.pt --title 春夜喜雨                  # one poem for a title
    python sample.py --ckpt ckpt_sft.pt --title 春夜喜雨 --num-samples 3 --temperature 1.0
    python sample.py --ckpt ckpt.pt --prompt '春夜喜雨\\n'                 # a base model continues raw text
    python sample.py --ckpt ckpt_sft.pt                                   # interactive: type titles, empty line quits
    python sample.py --ckpt ckpt_sft.pt --title 春夜喜雨 --rhyme          # the even lines' last characters rhyme
    python sample.py --ckpt ckpt_sft.pt --title 春夜喜雨 --form 七言絕句   # a poem of the form asked for
    python sample.py --ckpt ckpt_sft.pt --acrostic 春夏秋冬               # 藏頭詩: the lines open with these
    python sample.py --ckpt ckpt_sft.pt --task continue --input '床前明月光，疑是地上霜。'
    python sample.py --ckpt ckpt_sft.pt --instruction 請為這首詩擬一個題目 --input '...'   # any instruction
    python sample.py --ckpt ckpt_sft.pt --task acrostic                   # interactive: each typed line a head
    python sample.py --ckpt ckpt_sft_lora.pt --title 春夜喜雨              # LoRA adapters, on the base they recorded
    python sample.py --ckpt ckpt_chat.pt --chat --system 你只寫五言詩       # talk: a conversation, turn by turn

The checkpoint says what it is. A tuned one (finetune.py, kind "sft"; align.py, "dpo") gets
each title wrapped in the instruction prompt <INS>請用以下題目寫一首詩<INP>{title}<RES>
and stops at <|endoftext|>; --form, --acrostic and --task ask one of the other tasks of
data/tasks.py in its first training phrasing, --instruction asks anything. Interactive
mode asks the same of each typed line: a title, or with --task/--form/--instruction the
input of that request. A base one (pretrain.py, kind "pretrain") only ever saw
poems as "title\\nlines..." run together, so in interactive mode each typed title
becomes the prompt "title\\n"; it never learned to stop and runs to --max-new-tokens.
A chat model (finetune.py --format chat) is asked each request as the user's turn of a
conversation (data/chat.py), after the --system prompt if one is given, and its answer
ends at <|end|>. With --chat you talk with it: each typed line is your turn, and the
model answers with the whole conversation before it; when the conversation outgrows the
model's block_size, the oldest exchanges are forgotten (with a note); /reset starts over.

stdout carries only the generated text (and "--- sample N ---" headers with
--num-samples > 1), so it can be piped or saved; the header, notes and the interactive
prompt go to stderr. In --prompt, \\n means a newline, \\t a tab and \\\\ a backslash.
The generator is seeded once per run: the same flags and input give the same poems.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Collection

import torch

from data.errors import UserError, not_utf8
from data.forms import CLAUSE_BREAK, FORMS
from data.chat import ChatError, fit_history, render_ids, reserved_for_answer
from data.conversations import request_messages
from data.instruct import prompt_ids
from data.tasks import TASKS, task_instruction
from data.tokenizer import END, Tokenizer
from model import GPT
from tanggpt.checkpoint import KINDS, answers_prompts, tuned_format
from tanggpt.cli import flag, require_positive, run_cli
from tanggpt.device import Runtime, setup_runtime
from tanggpt.generation import SamplingConfig, for_generation, load_for_sampling


@dataclass
class SampleConfig(SamplingConfig):
    """sample.py's flags: the shared sampling flags (generation.py), and what to sample."""

    ckpt: str = flag("ckpt_sft.pt", "checkpoint to sample from: ckpt_sft.pt (finetune.py) or ckpt.pt (pretrain.py), "
                                    "or an adapter checkpoint of a --lora-rank run")
    base: str = flag("", "for an adapter checkpoint: its base checkpoint, when it is no longer at the path the "
                         "adapters recorded")
    title: str = flag("", "write a poem for this title, wrapped in the instruction prompt")
    prompt: str = flag("", r"raw text to continue instead of a title; \n in it is a newline, e.g. '春夜喜雨\n'")
    form: str = flag("", "with --title: ask for a poem of this form (the form task)", choices=list(FORMS))
    acrostic: str = flag("", "write an acrostic (藏頭詩) whose lines open with these characters, e.g. 春夏秋冬")
    task: str = flag("", "ask this task of data/tasks.py, in its first training phrasing, of --input (or of each "
                         "typed line)", choices=list(TASKS))
    instruction: str = flag("", "ask this instruction of --input (or of each typed line) instead of a task's")
    input: str = flag("", "the input of --task or --instruction: a title, a head, a first couplet or a poem "
                          r"(\n in it is a newline)")
    num_samples: int = flag(1, "samples of the same title or prompt, one after another")
    chat: bool = flag(False, "talk with a chat model (finetune.py --format chat): each typed line is your turn, "
                             "answered with the conversation so far; /reset starts a new one, an empty line quits")
    system: str = flag("", "a chat model's system prompt, e.g. 你只寫五言詩 (with --chat, or for a single request)")

    def validate(self, explicit: Collection[str] = ()) -> None:
        super().validate()
        require_positive(self, ("num_samples",))
        given = [f"--{name}" for name in ("title", "prompt", "acrostic", "input") if getattr(self, name)]
        if len(given) > 1:
            raise UserError(f"give one of --title, --prompt, --acrostic and --input, not {' and '.join(given)}")
        # --task form with --form (or --task acrostic with --acrostic) names one request twice
        same_request = bool(self.task == "form" and self.form or self.task == "acrostic" and self.acrostic)
        asks = [f"--{name}" for name in ("form", "acrostic", "task", "instruction")
                if getattr(self, name) and not (name == "task" and same_request)]
        if len(asks) > 1:
            raise UserError(f"give one of --form, --acrostic, --task and --instruction, not {' and '.join(asks)}")
        if self.prompt and asks:
            raise UserError(f"--prompt is raw text for a base model; {asks[0]} asks a tuned model instead")
        if self.input and not (self.task or self.instruction):
            raise UserError("--input is the input of --task or --instruction; give one of them (or use --title)")
        if self.title and (self.instruction or self.task not in ("", "poem", "form")):
            raise UserError(f"--title is the input of the poem and form tasks; with "
                            f"{'--instruction' if self.instruction else '--task ' + self.task} give --input")
        if self.task == "form" and not self.form:
            raise UserError(f"--task form needs --form, one of {', '.join(FORMS)}")
        if self.chat and (given or asks or self.num_samples > 1):
            raise UserError(f"--chat is a conversation you type, turn by turn; ask without "
                            f"{(given + asks)[0] if given + asks else '--num-samples'}")
        if self.system and self.prompt:
            raise UserError("--system is a chat model's system prompt; --prompt is raw text for a base model")
        for name in ("title", "prompt", "acrostic", "instruction", "input", "base", "system"):
            # typed but empty: an unfinished command line, not "interactive"
            if name in explicit and not getattr(self, name).strip():
                raise UserError(f"--{name} is empty")

    def instruction_text(self) -> str:
        """The instruction each title or input is asked with."""
        if self.instruction:
            return self.instruction
        task = "form" if self.form else "acrostic" if self.acrostic else self.task or "poem"
        return task_instruction(task, form=self.form)  # the poem task's first phrasing is the book's sentence

    def given_input(self) -> str:
        """The title, head or input given on the command line ("" = interactive)."""
        return self.title or self.acrostic or unescape(self.input)


def unescape(text: str) -> str:
    r"""Turn \n, \t and \\ typed on a command line into a newline, a tab and a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


class TextStream:
    """Token ids in, printable text out, one id at a time.

    The char tokenizer gives one character per id, but a tiktoken tokenizer may spell a
    character as several byte tokens; decoding only some of them gives U+FFFD. So ids
    are held back while their text ends in U+FFFD, until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is left at the end (truly invalid bytes stay U+FFFD)."""
        text, self.pending = self.tokenizer.decode(self.pending), []
        return text


def check_head(tokenizer: Tokenizer, head: str) -> None:
    """An acrostic head is characters the model can write at a line's start: known ones, no punctuation."""
    head = head.strip()
    if not head:
        raise UserError("--acrostic: the head is empty; give the characters the lines should open with")
    odd = [c for c in head if CLAUSE_BREAK.match(c) or c.isspace()]
    if odd:
        raise UserError(f"--acrostic {head}: {''.join(odd)!r} cannot open a line; give only the characters, "
                        "e.g. 春夏秋冬")
    unknown = [c for c in head if tokenizer.encode(c) == [tokenizer.unk_id]]
    if unknown:
        raise UserError(f"--acrostic {head}: {' '.join(unknown)} not in the tokenizer's vocabulary, so no line can "
                        "open with it")


def encode_prompt(tokenizer: Tokenizer, text: str, instruction: str | None, chat: bool = False,
                  system: str = "") -> list[int]:
    """The ids to continue: `text` as the input of `instruction`'s prompt (for a chat model, the
    request as the user's turn after the `system` prompt), or (None) raw text as it is. Say
    on stderr which characters the tokenizer does not know."""
    unknown: Counter = Counter()
    if instruction is None:
        ids = tokenizer.encode(text, unknown)
    elif chat:
        ids = render_ids(tokenizer, request_messages(instruction, text, system), add_generation_prompt=True,
                         unknown=unknown)
    else:
        ids = prompt_ids(tokenizer, instruction, text, unknown)
    if unknown:
        how = "replaced by <unk>" if tokenizer.unk_id in ids else "spelled out as bytes the model rarely saw"
        print(f"note: not in the tokenizer's vocabulary, {how}: {' '.join(unknown)}", file=sys.stderr)
    return ids


def write_samples(model: GPT, tokenizer: Tokenizer, ids: list[int], config: SampleConfig, runtime: Runtime,
                  generator: torch.Generator, warn_cut: bool, allowed: Callable | None = None,
                  max_new_tokens: int | None = None, stop_ids: Collection[int] = ()) -> str:
    """Stream config.num_samples continuations of the prompt `ids` to stdout, each ending in a newline,
    and return the last one's text. max_new_tokens below --max-new-tokens: where the model's
    block_size ends the answer first. Each stops at end-of-text, or at one of `stop_ids`."""
    limit = config.max_new_tokens if max_new_tokens is None else max_new_tokens
    stops = {tokenizer.eot_id, *stop_ids}
    for i in range(config.num_samples):
        if config.num_samples > 1:
            print(f"--- sample {i + 1} ---", flush=True)
        stream, stopped, text = TextStream(tokenizer), False, []
        with runtime.autocast():
            steps = model.generate_stream([ids], limit, stop_ids=stops,
                                          allowed=allowed,
                                          generator=generator, **config.generate_kwargs())
            for step in steps:
                token = int(step[0])
                if token in stops:
                    stopped = True
                    break
                text.append(stream.push(token))
                print(text[-1], end="", flush=True)  # flush: show each character as it comes
        text.append(stream.flush())
        print(text[-1], flush=True)
        if not stopped and limit < config.max_new_tokens:
            print(f"[no end-of-text: cut at the model's block_size {model.config.block_size}, prompt and answer "
                  "together; past it the model would no longer see the instruction]", file=sys.stderr)
        elif warn_cut and not stopped:
            print(f"[no end-of-text: cut at --max-new-tokens {config.max_new_tokens}]", file=sys.stderr)
    return "".join(text)


def check_instruction_fits(instruction_ids: int, block_size: int, typed: bool) -> None:
    """Refuse an instruction prompt that leaves no room for an input and an answer in block_size.
    `instruction_ids`: its tokens with the format's markers; `typed`: the user's --instruction, not a task's."""
    if instruction_ids >= block_size - 1:
        fix = "give a shorter --instruction" if typed else "this model's context is too short for any request"
        raise UserError(f"the instruction prompt alone is {instruction_ids} tokens, and this model reads at most "
                        f"{block_size} (its block_size), prompt and answer together; {fix}")


def answer_room(ids: list[int], instruction_ids: int, block_size: int, source: str) -> int:
    """How many tokens of answer fit after the instruction prompt `ids` in block_size.

    GPT.generate_stream crops a context longer than block_size from the front: the first
    tokens to go would be <INS> and the instruction, and the model would answer a request
    it no longer sees. So a prompt with no room left is refused (naming `source`, the flag
    or line its input came from), and the answer stops where the block ends.
    `instruction_ids`: the tokens the prompt has besides the input's (check_instruction_fits
    has made sure they leave room for some input).
    """
    room = block_size - len(ids)
    if room < 1:
        raise UserError(f"{source}: the prompt is {len(ids)} tokens (the instruction, the input and the markers), and "
                        f"this model reads at most {block_size} (its block_size), prompt and answer together; shorten "
                        f"the input to at most {block_size - 1 - instruction_ids} tokens")
    return room


def interactive(answer: Callable[[str], None], what: str, label: str = "title") -> None:
    """Read a line at a time (a title, or `what` the request takes) and answer it; an empty
    line, Ctrl-D or Ctrl-C at the prompt quits. A bad line (a head with an unknown
    character, bytes that are not UTF-8) is said and skipped."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if hasattr(sys.stdin, "reconfigure"):
        # A strict decoder raises on a line that is not UTF-8 and loses the rest of what it
        # had read; kept as surrogates, such a line is refused below and the next one is read.
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"Type {what} and press Enter; an empty line or Ctrl-D quits, Ctrl-C stops a poem.", file=sys.stderr)
    while True:
        print(f"{label}> ", end="", file=sys.stderr, flush=True)
        try:
            line = input().strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not line:
            return
        try:
            wrong = not_utf8(line)
            if wrong:
                raise UserError(f"that line is {wrong}; type it as UTF-8")
            answer(line)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # stop this poem only
            print(flush=True)  # end the cut poem's line, so the next one starts on its own
            print("[stopped]", file=sys.stderr)


def converse(model: GPT, tokenizer: Tokenizer, config: SampleConfig, runtime: Runtime, generator: torch.Generator,
             allowed: Callable | None, stop_ids: list[int]) -> None:
    """--chat: each typed line is the user's turn; the model answers it with the conversation
    so far (the --system prompt, then every exchange). The answer needs room in the block
    (data/chat.reserved_for_answer); to keep it, the oldest exchanges are forgotten
    (data/chat.fit_history), with a note. /reset forgets all but the system prompt."""
    system = [{"role": "system", "content": config.system}] if config.system else []
    block_size = model.config.block_size
    room = reserved_for_answer(block_size, config.max_new_tokens)
    history: list[dict] = list(system)

    def turn(line: str) -> None:
        nonlocal history
        if line == "/reset":
            history = list(system)
            print("[a new conversation" + (" (the system prompt kept)]" if system else "]"), file=sys.stderr)
            return
        try:
            kept, dropped = fit_history(tokenizer, history + [{"role": "user", "content": unescape(line)}],
                                        block_size - room)
        except ChatError as e:
            raise UserError(str(e)) from None
        if dropped:
            print(f"[the conversation outgrew the model's {block_size} tokens: the oldest {dropped} exchange"
                  f"{'s' * (dropped > 1)} forgotten]", file=sys.stderr)
        unknown: Counter = Counter()
        ids = render_ids(tokenizer, kept, add_generation_prompt=True, unknown=unknown)
        if unknown:
            print(f"note: not in the tokenizer's vocabulary: {' '.join(unknown)}", file=sys.stderr)
        reply = write_samples(model, tokenizer, ids, config, runtime, generator, warn_cut=True, allowed=allowed,
                              stop_ids=stop_ids)
        history = kept + [{"role": "assistant", "content": reply}]

    interactive(turn, "your turn (/reset starts a new conversation)", "you")


def run(config: SampleConfig, explicit: set[str]) -> None:
    config.validate(explicit)
    runtime = setup_runtime(config.device, config.dtype)
    ckpt, model, tokenizer = load_for_sampling(config.ckpt, "--ckpt", config.base)
    kind = ckpt["kind"]
    acrostic = config.acrostic or config.task == "acrostic"
    if config.acrostic:  # before any sampling: one line if a head cannot be written
        check_head(tokenizer, config.acrostic)
    chat = tuned_format(ckpt) == "chat"
    if (config.chat or config.system) and not chat:
        raise UserError(f"{'--chat' if config.chat else '--system'}: {config.ckpt} was not tuned on conversations; "
                        "talk to a model tuned with finetune.py --format chat")
    model = for_generation(model, runtime)
    answers = answers_prompts(kind)
    print(f"{config.ckpt}: {KINDS[kind]} model ({kind}), "
          f"{model.num_params() / 1e6:.2f}M parameters, on {runtime.describe()}; {config.describe()}", file=sys.stderr)
    if not answers:
        print(f"note: a base model continues text and will not stop by itself; each sample runs to "
              f"--max-new-tokens ({config.max_new_tokens})", file=sys.stderr)
        if not config.prompt:
            print("note: a base model was not trained on the instruction prompt; try --prompt 'TITLE\\n'"
                  if config.given_input() else "note: each typed title becomes the prompt 'title\\n'",
                  file=sys.stderr)
    generator = torch.Generator(device=runtime.device).manual_seed(config.seed)
    allowed = config.constraint(tokenizer)  # --rhyme; a tokenizer it cannot work with fails here
    block_size = model.config.block_size
    stop_ids = [tokenizer.special_ids[END]] if chat else []  # a chat model's turn ends at <|end|>
    if config.chat:
        return converse(model, tokenizer, config, runtime, generator, allowed, stop_ids)
    instruction = config.instruction_text()
    instruction_ids = len(encode_prompt(tokenizer, "", instruction, chat, config.system))
    source = next((f"--{name}" for name in ("title", "acrostic", "input") if getattr(config, name)), "this line")
    # Raw text: --prompt, or the titles typed to a base model asked nothing else; else instruction prompts.
    raw = bool(config.prompt) or not (answers or config.given_input() or config.task or config.instruction
                                      or config.form)
    if not raw:  # an instruction no input fits is refused now, not at each typed line
        check_instruction_fits(instruction_ids, block_size, bool(config.instruction))

    def answer(text: str, raw: bool = False) -> None:
        if acrostic:
            check_head(tokenizer, text)
        ids = encode_prompt(tokenizer, text, None if raw else instruction, chat, config.system)
        if raw:  # plain text has no instruction to lose: the model continues what its block holds
            if len(ids) > block_size:
                print(f"note: the prompt is {len(ids)} tokens; the model reads only the last {block_size} "
                      "(its block_size)", file=sys.stderr)
            limit = None
        else:
            limit = min(config.max_new_tokens, answer_room(ids, instruction_ids, block_size, source))
        write_samples(model, tokenizer, ids, config, runtime, generator, warn_cut=answers, allowed=allowed,
                      max_new_tokens=limit, stop_ids=stop_ids)

    if config.prompt:
        answer(unescape(config.prompt), raw=True)
    elif config.given_input():
        answer(config.given_input())
    elif raw:
        interactive(lambda title: answer(title + "\n", raw=True), "a title (the base model continues 'title\\n')")
    else:
        if acrostic:
            interactive(answer, "a head (the characters the lines open with)", "head")
        elif (config.task or "poem") in ("poem", "form") and not config.instruction:
            interactive(answer, "a title")
        else:
            interactive(answer, "an input (a first couplet, a poem, or what --instruction asks for)", "input")


def main(argv: list[str] | None = None) -> None:
    # Ctrl-C outside the interactive loop (while loading, or in a --title/--prompt run) is run_cli's:
    # "[stopped]" and exit code 130, the shell's code for "ended by Ctrl-C". So is `| head`: the
    # poems are the output, and with no one reading them there is nothing left to write them for.
    run_cli(run, SampleConfig, argv, __doc__.splitlines()[0], stop_on_closed_pipe=True)


if __name__ == "__main__":
    main()
