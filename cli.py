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
from typing import Any, Callable


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


def parse_config(cls: type, argv: list[str] | None, description: str) -> tuple[Any, set[str]]:
    """Parse flags for the dataclass `cls`; return the config and the names given explicitly.

    Knowing which flags were typed lets a resumed run tell "you asked for a different
    model shape" (an error) from "you left the default" (keep the checkpoint's).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        name = flag_name(f.name)
        kwargs = {"default": f.default, "help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.type in (bool, "bool"):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            parser.add_argument(name, type=kind or str, **kwargs)
    args = parser.parse_args(argv)
    explicit = {
        f.name
        for f in dataclasses.fields(cls)
        for arg in (argv if argv is not None else sys.argv[1:])
        if arg == flag_name(f.name) or arg.startswith(flag_name(f.name) + "=") or arg == "--no-" + f.name.replace("_", "-")
    }
    return cls(**vars(args)), explicit


def run_cli(run: Callable[[Any, set[str]], Any], config_cls: type, argv: list[str] | None, description: str) -> Any:
    """Parse the flags, call run(config, explicit) and return its result; a UserError exits 2."""
    config, explicit = parse_config(config_cls, argv, description)
    try:
        return run(config, explicit)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
