"""Command-line plumbing every script shares: config dataclass -> flags, and one-line errors.

A script declares its settings as a dataclass whose fields carry their --help text
(`flag`). `parse_config` turns the fields into --kebab-case flags and returns the
config together with the names the user typed, so a script can tell "you asked for
this" from "you left the default" (a resumed run keeps its checkpoint's model shape
unless told otherwise). `run_cli` runs a script and turns a UserError into one line on
stderr and exit code 2: bad input deserves a sentence, not a traceback.

Every entry point (the root scripts, tools/, poems/download.py) goes through these two,
so what they check holds for all: a float flag is a finite number, a text flag is UTF-8,
no flag is abbreviated, and output never raises, neither for text the terminal cannot
encode nor for a reader that closed the pipe (`| head`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, TextIO

from data.errors import UserError, not_utf8  # bad input, raised anywhere: run_cli prints it as one line


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C (SIGINT) or SIGTERM before it finished. The message says what
    was saved; the process exits 128 + the signal number (130, 143), as a shell expects of a
    command a signal ended, so `pretrain.py && finetune.py` does not go on with half a run."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def flag(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its --help text (and, optionally, its `choices`; `positional=True`
    for a list of names typed without a flag, such as run_notebooks' notebooks: a tuple)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class RuntimeConfig:
    """Flags every script has: where to run, in which precision."""

    device: str = flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = flag("auto", "auto (bf16 where the device computes in bf16, fp16 with loss scaling on an older "
                               "CUDA GPU, else fp32), float32, bfloat16 or float16 (tanggpt/device.py)")


def require_positive(config: object, names: tuple[str, ...]) -> None:
    """Raise a one-line UserError naming the first flag among `names` that is not positive."""
    for name in names:
        if getattr(config, name) <= 0:
            raise UserError(f"{flag_name(name)} must be positive, got {getattr(config, name)}")


def flag_name(field_name: str) -> str:
    """n_layer -> --n-layer"""
    return "--" + field_name.replace("_", "-")


def with_flag_names(message: str, config_cls: type) -> str:
    """`message` with each field name of the dataclass `config_cls` in it spelled as its flag:
    a library error ("n_embd (128) must be divisible by n_head (3)") in the words the user
    typed ("--n-embd (128) must be divisible by --n-head (3)")."""
    names = sorted((f.name for f in dataclasses.fields(config_cls) if "_" in f.name), key=len, reverse=True)
    if not names:
        return message
    return re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b", lambda m: flag_name(m[1]), message)


def finite_float(text: str) -> float:
    """argparse's type for a float flag: a number, and a finite one. float() reads "nan",
    "inf" and "1e999" as numbers; every check of the form `x < 0` lets nan through, and it
    then fails deep inside (torch.multinomial), so it is refused here, for every command."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def utf8_text(text: str) -> str:
    """argparse's type for a text flag (and a path): an argument that is not UTF-8 reaches
    Python as lone surrogates, which no UTF-8 file, log, checkpoint note or terminal can
    hold; refused here, in one line naming the flag, rather than as a UnicodeEncodeError
    when the run first prints or saves it."""
    wrong = not_utf8(text)
    if wrong:
        raise argparse.ArgumentTypeError(f"{wrong}; type it as UTF-8")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's own errors (unknown flag, a value that is not a number) as one line."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_config(cls: type, argv: list[str] | None, description: str, epilog: str = "") -> tuple[Any, set[str]]:
    """Parse flags for the dataclass `cls`; return the config and the names given explicitly.

    Every flag defaults to "not given" (argparse.SUPPRESS), so the parsed namespace holds
    exactly what was typed, and the dataclass fills in the rest. allow_abbrev=False:
    a prefix such as --n-lay is an error, not a silent --n-layer. A float flag must be a
    finite number (finite_float) and any other value UTF-8 text (utf8_text).
    """
    parser = _Parser(description=description, epilog=epilog or None, allow_abbrev=False,
                     argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        shown = "" if f.default in ("", ()) else " (default: auto)" if f.default is None else f" (default: {f.default})"
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", "") + shown}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="*", type=utf8_text, **kwargs)
        elif kind in ("bool", "bool | None"):  # None: neither flag typed, the script decides
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag_name(f.name), type={"int": int, "float": finite_float}.get(kind, utf8_text),
                                **kwargs)
    given = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional") and f.name in given:
            if not given[f.name]:  # nothing typed: the default, and not counted as typed
                del given[f.name]
            else:
                given[f.name] = tuple(given[f.name])
    return cls(**given), set(given)


def restore_run_flags(config: Any, explicit: set[str], saved: dict, fixed: set[str], out: str,
                      before_the_flag: dict | None = None) -> list[str]:
    """--resume continues a run with the settings it was started with (`saved`, from its checkpoint).

    A flag `saved` does not record did not exist when the run started: it takes its
    `before_the_flag` value, the one such runs were trained with, where one is given.

    A flag not typed now takes the run's value. A typed one that differs is refused when it
    is in `fixed` (it decides which batches or which model the run trains: another value
    would not continue the same run), and otherwise applied, with a note returned to print.
    """
    notes = []
    saved = {**(before_the_flag or {}), **saved}
    for f in dataclasses.fields(config):
        if f.name in ("resume", "out", "overwrite") or f.name not in saved:
            continue
        value, before = getattr(config, f.name), saved[f.name]
        if f.name not in explicit:
            setattr(config, f.name, before)
        elif value != before and f.name in fixed:
            raise UserError(f"{flag_name(f.name)} {value}: the run at {out} was started with {before!r}, and a resumed "
                            "run keeps it; drop the flag, or start a new run with another --out")
        elif value != before:
            notes.append(f"note: {flag_name(f.name)} {value} (the run was started with {before!r})")
    return notes


def resume_rule(fixed: set[str]) -> str:
    """The --help text that states what restore_run_flags does with a script's flags."""
    return (f"--resume continues a run with the settings it was started with. These flags are never changed on "
            f"resume (typed with another value, they are refused): {', '.join(flag_name(n) for n in sorted(fixed))}. "
            "Any other flag typed with --resume (say a larger --max-iters, another --lr or --device) is applied from "
            "the next step on, with a note.")


class _Output:
    """sys.stdout or sys.stderr while a command runs (run_cli): the stream, unable to stop the command.

    Text the stream's encoding cannot hold (a lone surrogate, Chinese on an ASCII terminal)
    is written with backslash escapes instead of raising UnicodeEncodeError. A reader that
    went away (`| head -2`) makes the next write or flush raise BrokenPipeError, from
    whichever print it was: inside a training loop that would end the run before it saves.
    So from then on the stream's file descriptor points at os.devnull (the interpreter's
    own flush at exit finds no pipe to fail on) and the output is dropped: the command goes
    on quietly, or, when its output is its only product (`stop`: sample.py's poems, bench's
    figures), the BrokenPipeError goes on up to run_cli, which ends it with exit code 0.
    """

    def __init__(self, stream: TextIO, stop: bool):
        self.stream, self.stop, self.reader_gone = stream, stop, False

    def write(self, text: str) -> int:
        if self.reader_gone:
            return len(text)
        try:
            try:
                return self.stream.write(text)
            except UnicodeEncodeError:  # raised before anything is written: the whole text again, escaped
                encoding = getattr(self.stream, "encoding", None) or "utf-8"
                return self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except BrokenPipeError:
            self._drop_from_now_on()
            return len(text)

    def flush(self) -> None:
        if self.reader_gone:
            return
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._drop_from_now_on()

    def _drop_from_now_on(self) -> None:
        self.reader_gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):  # no descriptor (a test's capture): dropping is enough
            pass
        if self.stop:
            raise BrokenPipeError("the reader of the output went away")

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer...: the stream's own
        return getattr(self.stream, name)


def run_cli(run: Callable[[Any, set[str]], Any], config_cls: type, argv: list[str] | None, description: str,
            epilog: str = "", stop_on_closed_pipe: bool = False) -> Any:
    """Parse the flags, call run(config, explicit) and return its result.

    A UserError exits 2 with its line; an interrupted run exits 130 (Ctrl-C) or 143 (SIGTERM)
    with a line saying what was saved. Neither prints a traceback. While it runs, stdout and
    stderr never raise (_Output): a reader that closes them early (`| head`) is not an error,
    the rest of the output is dropped and the command goes on to the end, so a training run
    still saves its checkpoint; with stop_on_closed_pipe (a command whose output is its only
    product) it ends there instead, quietly, exit 0.
    """
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_Output(s, stop_on_closed_pipe) if s is not None else s for s in streams)
    try:
        config, explicit = parse_config(config_cls, argv, description, epilog)
        return run(config, explicit)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C while loading, or a second one while saving: at once, no traceback
        print("\n[stopped]", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away and the command asked to stop (or wrote past _Output)
        for stream in streams:
            _Output(stream, stop=False).flush()  # points a closed one at os.devnull: nothing left to fail at exit
        sys.exit(0)
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Output):
                stream.stop = False  # the command is over: a closed pipe now only needs catching
                stream.flush()  # here, not in the interpreter's flush at exit, where it would print a warning
        sys.stdout, sys.stderr = streams
