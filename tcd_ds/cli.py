"""The command-line convention shared by every `python -m tcd_ds.*` command.

- Bad input (a bad flag, a bad value, a missing or malformed file, a bad config key) prints ONE
  line, `error: <what and how to fix it>`, on stderr and exits with status 2: `Parser` does it for
  argparse's own errors, `fail` / `exit_on` for the rest (`fail(err, status)` for a failure with
  another status, `print_error` where the caller exits itself). No traceback for anything the user
  can fix; no module prints `error:` by hand.
- `--help` shows every option's default (`DefaultsFormatter`), unless the help text already names it.
- Durations in progress lines and reports read `1h02m03s` or `2m03s` (`format_duration`).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, NoReturn

USAGE_ERROR = 2


def format_duration(seconds: float) -> str:
    """`seconds` (rounded to whole seconds, negatives as 0) as `2m03s`, or `1h02m03s` from an hour."""
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def print_error(message: object) -> None:
    """The `error:` line on stderr (flushed), for a caller that exits in its own way (another status,
    only on one rank, after logging it elsewhere too); `fail` for the usual case."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def fail(message: object, status: int = USAGE_ERROR) -> NoReturn:
    """One `error:` line (the message's first line) on stderr, then exit with `status` (2: bad input)."""
    text = str(message).strip().splitlines()
    print_error(text[0] if text else "bad input")
    raise SystemExit(status)


@contextlib.contextmanager
def exit_on(*errors: type[BaseException]) -> Iterator[None]:
    """`with exit_on(ConfigError, OSError): ...` turns those exceptions into `fail(err)`."""
    try:
        yield
    except errors as err:
        fail(err)


def _shown(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds `(default: X)` to options that have a default worth showing (not None / False / a
    suppressed one) and whose help does not already say it; descriptions keep their layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == argparse.SUPPRESS
                or "default" in text or text == argparse.SUPPRESS):
            return text
        shown = _shown(default).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(USAGE_ERROR, f"error: {message} (see --help)\n")
