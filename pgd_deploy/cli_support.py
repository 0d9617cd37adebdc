"""What the three console scripts share: logging set-up, errors to exit codes, and argparse
choices taken from the config's `Literal` types (so a flag and its config key accept the same
values). Standard library only: `pgd-serve` runs without torch.

Exit codes of every command: 0 success, 1 an unexpected failure of a step (e.g. a TensorRT
build), 2 bad input (a message names the file or key and what was expected), 130 interrupted;
`pgd-export` adds 3-5 for its failed accuracy gates.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Callable
from typing import Any, Literal

BAD_INPUT, STEP_FAILED, INTERRUPTED = 2, 1, 130


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with `-v`) to stderr, one line per record with time, level and logger."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def fail(prog: str, message: str, code: int = BAD_INPUT) -> int:
    """Print `prog: error: message` to stderr; return `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run one command; bad input (ValueError, missing files, a missing optional package, a
    port in use) exits 2, a failed step (RuntimeError) 1, Ctrl-C 130, each with one line on
    stderr and no traceback."""
    try:
        return command()
    except (ValueError, OSError, ImportError) as err:
        return fail(prog, str(err))
    except RuntimeError as err:
        logging.getLogger("pgd_deploy").debug("%s failed", prog, exc_info=True)  # -v: traceback
        return fail(prog, str(err), STEP_FAILED)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


def choices(cls: type, name: str) -> list[Any]:
    """The values the config field `cls.name` accepts, from its `Literal[...]` annotation
    (`X | None` fields included), for argparse's `choices=`."""
    tp = typing.get_type_hints(cls)[name]
    args = [tp]
    while args:
        current = args.pop()
        if typing.get_origin(current) is Literal:
            return list(typing.get_args(current))
        args.extend(typing.get_args(current))
    raise TypeError(f"{cls.__name__}.{name} is not a Literal field")
