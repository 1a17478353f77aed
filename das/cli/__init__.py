"""The ``das-rollout`` command line: one subcommand per job, each with its own handler.

To add a subcommand, write ``add_<name>_parser(subparsers)`` (registering options) and a handler
``run_<name>(args) -> int`` (in ``das/cli/<name>.py``), then list the pair in
:data:`SUBCOMMANDS`. Handlers import heavy modules (vLLM, torch) lazily so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from das.cli.demo import add_demo_parser, run_demo
from das.cli.import_trace import add_import_parser, run_import
from das.cli.record import add_record_parser, run_record
from das.cli.replay import add_replay_parser, run_replay
from das.cli.run import add_run_parser, run_run

AddParser = Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
Handler = Callable[[argparse.Namespace], int]

# name -> (adds the subcommand's parser, runs it). Order is the order in --help.
SUBCOMMANDS: dict[str, tuple[AddParser, Handler]] = {
    "record": (add_record_parser, run_record),
    "import": (add_import_parser, run_import),
    "replay": (add_replay_parser, run_replay),
    "run": (add_run_parser, run_run),
    "demo": (add_demo_parser, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``das-rollout`` parser with every subcommand in :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="das-rollout",
        description=(
            "DAS: distribution-aware speculative decoding for RL rollouts, with a suffix-tree "
            "drafter built from recent rollouts of the same prompts."
        ),
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (add_parser, handler) in SUBCOMMANDS.items():
        subparser = add_parser(subparsers)
        assert subparser.prog.split()[-1] == name, f"{name!r} registered as {subparser.prog!r}"
        subparser.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``das-rollout``; returns the exit code of the chosen subcommand."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
