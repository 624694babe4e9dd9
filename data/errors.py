"""Bad input: the one exception every command turns into a line of text, exit code 2.

It lives here, at the bottom of the house, because data/ is where the user's input is
first read (poem folders, --data files, tokenizer names) and data/ imports nothing above
it. Every module's error for bad input subclasses it (CorpusError, TokenizerError,
CheckpointError, DeviceError, ...), so tanggpt/cli.py's run_cli catches this one class.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a flag, a file, a record): printed as one line, exit code 2, no traceback."""
