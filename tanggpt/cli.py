"""Command-line plumbing every script shares: config dataclass -> flags, and one-line errors.

A script declares its settings as a dataclass whose fields carry their --help text
(`flag`). `parse_config` turns the fields into --kebab-case flags and returns the
config together with the names the user typed, so a script can tell "you asked for
this" from "you left the default" (a resumed run keeps its checkpoint's model shape
unless told otherwise). `run_cli` runs a script and turns a UserError into one line on
stderr and exit code 2: bad input deserves a sentence, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

from data.errors import UserError  # bad input, raised anywhere: run_cli prints it as one line


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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's own errors (unknown flag, a value that is not a number) as one line."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_config(cls: type, argv: list[str] | None, description: str, epilog: str = "") -> tuple[Any, set[str]]:
    """Parse flags for the dataclass `cls`; return the config and the names given explicitly.

    Every flag defaults to "not given" (argparse.SUPPRESS), so the parsed namespace holds
    exactly what was typed, and the dataclass fills in the rest. allow_abbrev=False:
    a prefix such as --n-lay is an error, not a silent --n-layer.
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
            parser.add_argument(f.name, nargs="*", type=str, **kwargs)
        elif kind in ("bool", "bool | None"):  # None: neither flag typed, the script decides
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag_name(f.name), type={"int": int, "float": float}.get(kind, str), **kwargs)
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


def run_cli(run: Callable[[Any, set[str]], Any], config_cls: type, argv: list[str] | None, description: str,
            epilog: str = "") -> Any:
    """Parse the flags, call run(config, explicit) and return its result.

    A UserError exits 2 with its line; an interrupted run exits 130 (Ctrl-C) or 143 (SIGTERM)
    with a line saying what was saved. Neither prints a traceback. A reader that closes
    stdout early (`| head`) ends the command quietly, exit 0.
    """
    config, explicit = parse_config(config_cls, argv, description, epilog)
    try:
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
    except BrokenPipeError:  # stdout closed early, as by `| head`: not an error, but say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
