"""The command line's shared pieces: the argument parser every `gpuflow` command uses and the
one wording of its errors (`gpuflow train: error: <message>. help: <fix>`). A module below
both gpuflow/cli/ and gpuflow/bench/, so that `gpuflow bench` (and `python -m gpuflow.bench`)
parses its own options without importing the CLI, which imports the bench only to hand it argv."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any, NoReturn, Sequence

from .errors import GpuflowError


class CommandError(GpuflowError):
    """A command-line mistake or a missing optional dependency, reported as one line."""


class CommandParser(argparse.ArgumentParser):
    """argparse as every gpuflow command uses it: no abbreviations (`--epoch` is not
    `--epochs`), each mistake one line naming the command with a `help:` pointing at that
    command's --help, and the closest option suggested for an unknown one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, CommandParser] = {}   # subcommand parsers, by name

    def add_command(self, commands: Any, name: str, **kwargs: Any) -> "CommandParser":
        """commands.add_parser(name, ...), remembered so its own --help is named on errors."""
        parser = commands.add_parser(name, **kwargs)
        self.commands[name] = parser
        return parser

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the subcommand that was given them, not by `gpuflow`
            self.commands.get(getattr(ns, "command", None), self).unrecognized(extras)
        return ns

    def unrecognized(self, extras: Sequence[str]) -> NoReturn:
        """One line for unknown arguments, with the closest known option for each."""
        names = [o[2:] for action in self._actions for o in action.option_strings
                 if o.startswith("--")]
        hints = []
        for arg in extras:
            if arg.startswith("-"):  # compared without the dashes, which every option shares
                word = arg.split("=", 1)[0].lstrip("-")
                close = difflib.get_close_matches(word, names, n=1, cutoff=0.7)
                hints += [f"did you mean --{close[0]}?"] if close else []
        self.error(f"unrecognized arguments: {' '.join(extras)}", hint=" ".join(hints))

    def error(self, message: str, hint: str = "") -> NoReturn:  # type: ignore[override]
        see = f"see '{self.prog} --help'"
        help_line = f"{hint} ({see})" if hint else f"{see}."
        self.exit(2, format_error(self.prog, f"{message}.\nhelp: {help_line}") + "\n")


def format_error(prog: str, error: "BaseException | str") -> str:
    """The one wording of a command-line error: 'gpuflow train: error: <message on one line>'
    (gpuflow messages put their 'help:' on a second line; it joins the first). A message that
    lists items on indented lines ('  parameter ...') keeps them, each on its own line below
    that one, so that a long list is not run together into one line."""
    lines = [part for part in str(error).splitlines() if part.strip()]
    items = [part.rstrip() for part in lines[1:] if part.startswith("  ")]
    text = " ".join(part.strip() for part in lines if not (part.startswith("  ")
                                                          and part is not lines[0]))
    return "\n".join([f"{prog}: error: {text or type(error).__name__}", *items])


def report_error(prog: str, error: "BaseException | str") -> int:
    """Print `format_error(prog, error)` on stderr; returns 2, the exit status of a mistake."""
    print(format_error(prog, error), file=sys.stderr)
    return 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' once, for options that have a real default (not None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action)
