"""Checks of command-line values shared by the scripts: each flag is validated when it is parsed, so a bad value
ends the run at once with a message naming the flag, not hours later with a traceback.

The number types are argparse `type=` callables; the path and device checks take the parser, so their
errors read like argparse's own ("train.py: error: --out ...").
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from models.fileio import check_writable_dir

PRECISIONS = ("auto", "fp32", "bf16")  # train.py and sample.py --precision: the backbone's autocast (models/precision.py)


def _number(kind, test, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "an integer > 0")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
above_one = _number(float, lambda v: v > 1, "a finite number > 1")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
decay = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_unit = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def float_in(low: float, high: float, what: str):
    """A finite number in [low, high]; `what` is how the message names it ("expected a radius in [2, 12] A")."""
    return _number(float, lambda v: low <= v <= high, what)


def clip_value(text: str):
    """--grad-clip: a finite number >= 0, or "adaptive"."""
    return "adaptive" if text == "adaptive" else _number(float, lambda v: v >= 0, 'a finite number >= 0 or "adaptive"')(text)


def checked_device(parser: argparse.ArgumentParser, flag_value: str | None):
    """The torch device of a --device flag (None: cuda if available, else cpu); refuses cuda without a GPU."""
    import torch

    if flag_value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag_value)
    except RuntimeError:
        parser.error(f"--device {flag_value}: not a device (use cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {flag_value}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {flag_value}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                         f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {flag_value}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def writable_dir(parser: argparse.ArgumentParser, path, flag: str) -> Path:
    """Create the directory a flag names (or that holds its output) and prove it writable, before any work."""
    try:
        return check_writable_dir(Path(path), flag)
    except OSError as e:
        parser.error(str(e))


def output_file(parser: argparse.ArgumentParser, path, flag: str) -> Path:
    """A file a flag names: not a directory, and its directory writable."""
    path = Path(path)
    if path.is_dir():
        parser.error(f"{flag} {path} is a directory; give a file name")
    writable_dir(parser, path.parent, f"{flag}'s directory")
    return path


class MarkdownFlags(argparse.Action):
    """--help-markdown: print the parser's flags as markdown tables and exit. `python -m models.report` writes them
    into models/README.md between markers, so the flag reference is the parsers' own text and cannot drift."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(flag_tables(parser), end="")
        parser.exit()


def add_markdown_help(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--help-markdown", action=MarkdownFlags, help="print every flag as markdown tables (the flag "
                        "reference in models/README.md, written there by python -m models.report) and exit")


def _flag_row(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """One table row: the flag (with its choices, or its metavar where one is set), its default, its help."""
    if action.option_strings:
        flag = "--[no-]" + action.option_strings[0][2:] if isinstance(action, argparse.BooleanOptionalAction) \
            else max(action.option_strings, key=len)
        if action.choices is not None:
            flag += " {" + ",".join(str(c) for c in action.choices) + "}"
        elif action.metavar is not None:
            flag += " " + parser._get_formatter()._format_args(action, action.metavar)
    else:
        flag = action.metavar or action.dest.upper()
    default = action.default
    shown = "" if default is None or default is False or default is argparse.SUPPRESS or default == [] else \
        f"`{' '.join(map(str, default)) if isinstance(default, (list, tuple)) else default}`"
    text = " ".join((action.help or "").split())
    if "%" in text:
        text = text % {"default": default, "prog": parser.prog}
    return f"| `{flag}` | {shown} | {text.replace('|', chr(92) + '|')} |"


def _rows(parser: argparse.ArgumentParser) -> list[str]:
    return [_flag_row(parser, a) for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, MarkdownFlags, argparse._SubParsersAction))]


def flag_tables(parser: argparse.ArgumentParser) -> str:
    """Markdown: a table of the parser's flags and, for a parser with subcommands, one table per set of subcommands
    that share rows (the flags every sweep of scale.py takes come once, not once per sweep)."""
    head = "| flag | default | what it does |\n|---|---|---|\n"
    out = []
    if rows := _rows(parser):
        out.append(f"**{parser.prog}**\n\n{head}" + "".join(r + "\n" for r in rows))
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        holders: dict[str, list[str]] = {}  # row -> the subcommands that take it, in their order
        for name, subparser in sub.choices.items():
            for row in _rows(subparser):
                holders.setdefault(row, []).append(name)
        groups: dict[tuple, list[str]] = {}
        for row, names in holders.items():
            groups.setdefault(tuple(names), []).append(row)
        for names, rows in groups.items():
            out.append(f"**{parser.prog} {' | '.join(names)}**\n\n{head}" + "".join(r + "\n" for r in rows))
    return "\n".join(out)
