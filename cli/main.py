"""`sheafprune` command line: parse, call one library verb, print. Bad input -> `error: ...`, exit code 2; a run
that cannot go on (RunFailed, e.g. a NaN loss) -> `error: ...`, exit code 1."""

from __future__ import annotations

import argparse
import importlib
import sys

from sheafprune.errors import RunFailed, UserError

# Each command lives in its own module exposing `register(subparsers)`; the handler is set as `func`.
COMMANDS = ("discover", "export", "eval", "show", "listing")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, instead of argparse's usage dump
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sheafprune", description="Find, compact and export task sheaves of language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"sheafprune.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"sheafprune.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
