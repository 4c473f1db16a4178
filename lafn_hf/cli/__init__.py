"""``lafn``, the command line: one module per family of commands, each adding its subcommands to the parser.

``common`` (loading a model by name, the config options), ``banks`` (demo, edit, info, push), ``measure`` (eval,
bench, neurons), ``service`` (serve, models). Errors in the input end a command with status 2 and one line on
stderr; the Hub's refusals and network failures with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import banks, measure, service

__all__ = ["build_parser", "main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lafn-hf")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lafn", description="Multilingual knowledge editing (LAFN) for HF LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO level)")
    parser.add_argument("--version", action="version", version=f"lafn {_version()}",
                        help="print the lafn-hf version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (banks, measure, service):
        module.add_commands(sub)
    return parser


def _hub_problem(error: BaseException) -> str | None:
    """One line for a network failure or a refusal by the Hub (any HTTP client huggingface_hub uses), else None."""
    from huggingface_hub.errors import HfHubHTTPError

    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub refused the request: {first_line}"
    transport = any(cls.__name__ in ("TransportError", "ConnectionError", "Timeout")
                    and cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
                    for cls in type(error).__mro__)
    if transport or isinstance(error, (ConnectionError, TimeoutError)):
        return f"cannot reach the Hugging Face Hub ({type(error).__name__}: {first_line}); check the network"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.run(args))
    except Exception as error:
        problem = _hub_problem(error)
        if problem is not None:
            print(f"lafn {args.command}: error: {problem}", file=sys.stderr)
            return 1
        if isinstance(error, (ValueError, TypeError, ImportError, OSError)):
            print(f"lafn {args.command}: error: {error}", file=sys.stderr)
            return 2
        raise
