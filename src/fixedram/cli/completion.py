"""``completion`` subcommand: a bash or zsh completion script generated from the parser."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  eval "$(fixedram completion bash)"                         this shell only
  fixedram completion bash > ~/.local/share/bash-completion/completions/fixedram
  fixedram completion zsh > "${fpath[1]}/_fixedram"          then: compinit
"""

# Arguments that name files or directories: completed as paths.
_PATH_DESTS = frozenset({"file", "input", "output", "svg", "plot", "against", "dir", "directory"})


def cmd_completion(a: argparse.Namespace) -> int:
    import shtab

    from .main import build_parser

    parser = build_parser()
    _mark_paths(parser, shtab.FILE)
    sys.stdout.write(shtab.complete(parser, shell=a.shell))
    return 0


def _mark_paths(parser: argparse.ArgumentParser, file: object) -> None:
    """Tell shtab which arguments complete as paths (the others complete options only)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                _mark_paths(p, file)
        elif action.dest in _PATH_DESTS and not action.choices:
            action.complete = file  # type: ignore[attr-defined]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("completion", help="print a bash or zsh completion script",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("shell", choices=("bash", "zsh"))
    s.set_defaults(func=cmd_completion)
