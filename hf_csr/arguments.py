"""The command-line conventions of ``hf-csr`` and the recipes (standard library only).

As in transformers: options are spelled with underscores (``--output_dir``), the dash spelling
(``--output-dir``) is accepted as an alias and not listed in ``--help``; ``--log_level`` takes
transformers' level names (any case) and works before or after a subcommand; ``--help`` shows the options
in groups, hf_csr's own first. Nothing here imports torch, so every ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

__all__ = ["LOG_LEVELS", "DefaultsHelpFormatter", "HelpFormatter", "add_command", "add_log_level", "add_option", "dash_alias"]

#: ``--log_level`` values (transformers' names, without ``passive``).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def dash_alias(flag: str) -> str:
    """``--output_dir`` -> ``--output-dir`` (the same string when it has no underscore)."""
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def add_option(parser: Any, flag: str, *more: str, **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(flag, <its dash alias>, *more, **kwargs)``: ``flag`` in underscore style."""
    flags = [flag]
    alias = dash_alias(flag)
    if alias != flag:
        flags.append(alias)
    return parser.add_argument(*flags, *more, **kwargs)


class HelpFormatter(argparse.HelpFormatter):
    """Lists an option under its underscore spelling only (the dash aliases are accepted but not shown);
    wraps each paragraph of a description or epilog, and keeps a paragraph with indented lines (an
    example command) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line[:1].isspace() for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        strings = action.option_strings
        shown = [s for s in strings if not (s.startswith("--") and "-" in s[2:]
                                            and "--" + s[2:].replace("-", "_") in strings)]
        if shown != strings:
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)


class DefaultsHelpFormatter(HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """:class:`HelpFormatter` that also shows each option's default (the recipes' parser)."""


def add_log_level(parser: Any, *, top_level: bool) -> None:
    """``--log_level`` (alias ``--log-level``). The top-level parser holds the default (``info``); a
    subcommand's copy sets the value only when given, so the option works before or after the subcommand."""
    add_option(
        parser, "--log_level", type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
        default="info" if top_level else argparse.SUPPRESS,
        help=f"logging level: {', '.join(LOG_LEVELS)} (default: info; debug also prints the traceback of an error)",
    )


def add_command(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand of ``hf-csr`` with the conventions above (help formatter, ``--log_level`` after it)."""
    parser = subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    add_log_level(parser, top_level=False)
    return parser
