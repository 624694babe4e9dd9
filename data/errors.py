"""Bad input: the one exception every command turns into a line of text, exit code 2.

It lives here, at the bottom of the house, because data/ is where the user's input is
first read (poem folders, --data files, tokenizer names) and data/ imports nothing above
it. Every module's error for bad input subclasses it (CorpusError, TokenizerError,
CheckpointError, DeviceError, ...), so tanggpt/cli.py's run_cli catches this one class.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a flag, a file, a record): printed as one line, exit code 2, no traceback."""


def lone_surrogate(text: str) -> str | None:
    """The first character of `text` that UTF-8 cannot encode, or None when it is all text.

    Only a lone surrogate (U+D800..U+DFFF) is such a character. It reaches a str two ways: a
    JSON escape of half a UTF-16 pair ("\\ud800" in a --data record or a corpus file), or a
    command-line argument that is not UTF-8 (Python keeps each bad byte as U+DC80..U+DCFF,
    "surrogateescape"). Printed or written as UTF-8 it raises UnicodeEncodeError, so input
    is checked for it where it is read, and refused or dropped there with its place named.
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return text[e.start]


def not_utf8(text: str) -> str | None:
    """For text Python decoded with surrogateescape (command-line arguments, a terminal's
    lines): None when it is all text, else what is wrong, as "not UTF-8 text (the byte 0xff
    at character 3)", to follow the flag or place it came from."""
    bad = lone_surrogate(text)
    if bad is None:
        return None
    what = f"the byte 0x{ord(bad) - 0xDC00:02x}" if "\udc80" <= bad <= "\udcff" else f"\\u{ord(bad):04x}"
    return f"not UTF-8 text ({what} at character {text.index(bad) + 1})"
