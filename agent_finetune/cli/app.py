"""`agent-finetune`: the command-line entry point.

Exit codes, the same for every command:

====  ==========================================================================
0     success
1     the operation failed: bad input, a missing registry or name, a validation
      failure, a server that is down (the message says which and how to fix it)
2     usage error: unknown command or flag, a missing argument (argparse)
3     refused by the promotion gate: the candidate did not beat the live version
      (`promote --if-better`, `train` with `promotion.policy: if_better`,
      `retrain`); the
      table of scores is printed, the decision is in history
130   interrupted (Ctrl-C)
141   stdout was closed early (``agent-finetune history x --json | head``): the output
      stops quietly, as a shell reports SIGPIPE
====  ==========================================================================

Only this module turns exceptions into exit codes and friendly text. Command modules import
their heavy dependencies (torch, vLLM, the server plugin) inside their handlers, so
``agent-finetune --help`` starts fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from agent_finetune._version import __version__
from agent_finetune.cli.ask import add_ask_parser
from agent_finetune.cli.canary import add_canary_parser
from agent_finetune.cli.capture import add_capture_parsers
from agent_finetune.cli.demo import add_demo_parser
from agent_finetune.cli.eval import add_eval_parser
from agent_finetune.cli.models import add_models_parser
from agent_finetune.cli.registry_commands import add_registry_parsers
from agent_finetune.cli.retrain import add_retrain_parser
from agent_finetune.cli.serve import add_serve_parser, add_sync_parser
from agent_finetune.cli.status import add_status_parser
from agent_finetune.cli.train import add_train_parser
from agent_finetune.errors import AgentFinetuneError, GateRefusedError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_PIPE = 130, 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-finetune",
        description="Fine-tune LoRA adapters, publish them to a versioned registry, and hot-swap "
        "them into a running vLLM server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_registry_parsers(sub)
    add_eval_parser(sub)
    add_canary_parser(sub)
    add_capture_parsers(sub)
    add_retrain_parser(sub)
    add_serve_parser(sub)
    add_sync_parser(sub)
    add_status_parser(sub)
    add_demo_parser(sub)
    add_models_parser(sub)
    add_ask_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per HTTP request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's exit
        return code
    except GateRefusedError as e:
        print(f"refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except AgentFinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`). Point stdout at /dev/null so the interpreter's
        # final flush cannot raise again (Python's documented recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
