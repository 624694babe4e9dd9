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
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn


class UserError(Exception):
    """Bad input (a flag, a file, a record): printed as one line, exit code 2, no traceback.

    Every module's error for bad input subclasses this one (CorpusError, TokenizerError,
    DeviceError, CheckpointError, ...), so run_cli needs no list of them.
    """


def flag(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its --help text (and, optionally, its `choices`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class RuntimeConfig:
    """Flags every script has: where to run, in which precision."""

    device: str = flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = flag("auto", "auto (bf16 where the device has fast bf16, else fp32), float32 or bfloat16")


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


def parse_config(cls: type, argv: list[str] | None, description: str) -> tuple[Any, set[str]]:
    """Parse flags for the dataclass `cls`; return the config and the names given explicitly.

    Every flag defaults to "not given" (argparse.SUPPRESS), so the parsed namespace holds
    exactly what was typed, and the dataclass fills in the rest. allow_abbrev=False:
    a prefix such as --n-lay is an error, not a silent --n-layer.
    """
    parser = _Parser(description=description, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        kwargs: dict[str, Any] = {"help": f"{f.metadata.get('help', '')} (default: {f.default})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag_name(f.name), type={"int": int, "float": float}.get(kind, str), **kwargs)
    given = vars(parser.parse_args(argv))
    return cls(**given), set(given)


def run_cli(run: Callable[[Any, set[str]], Any], config_cls: type, argv: list[str] | None, description: str) -> Any:
    """Parse the flags, call run(config, explicit) and return its result; a UserError exits 2."""
    config, explicit = parse_config(config_cls, argv, description)
    try:
        return run(config, explicit)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
