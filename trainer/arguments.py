"""Command-line conventions shared by the `trainer` and `tuner` commands.

- A usage mistake is one line on stderr and exit code 2 (argparse prints the whole usage block first;
  a user reads the one line that says what is wrong, and `--help` is there for the rest).
- Overrides come in two spellings: `--set a.b=v` (argparse's habit) and bare `a.b=v` (Hydra's, which
  solo-learn and many DINO users type).
- Exit codes mean the same in every command (`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer.config import ConfigError

#: What every command's exit status means; shown in `--help`.
EXIT_CODES = "exit codes: 0 done; 1 the run or a measurement failed; 2 a usage or config mistake; 130 interrupted"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit code 2), like the config errors."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def split_config_and_overrides(tokens: list[str], command: str) -> tuple[str | None, list[str]]:
    """Positional words after `trainer CMD`: at most one CONFIG (a path or a shipped name) and any `a.b=v`."""
    config, overrides = None, []
    for token in tokens:
        if token.startswith("-"):
            raise ConfigError(f"{command}: unrecognized option {token!r} (see trainer {command} --help)")
        if "=" in token:
            overrides.append(token)
        elif config is None:
            config = token
        else:
            raise ConfigError(f"{command}: two configs given ({config!r} and {token!r}); give one CONFIG, "
                              f"and overrides as KEY=VALUE or --set KEY=VALUE")
    return config, overrides


def quiet_broken_pipe() -> int:
    """The reader of stdout stopped early (`tuner status -f csv | head`): not an error; say nothing more.

    Python would otherwise print a BrokenPipeError traceback, and again when it flushes stdout at exit.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0
