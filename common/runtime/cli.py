"""The one ``fedcontrast`` command.

Subcommands are not imported here: each package (client, server, simulations)
declares its own under the ``fedcontrast.commands`` entry-point group in
``pyproject.toml``, and this dispatcher finds them at run time. That keeps
``common`` free of federation code.

An entry point names a :class:`Command` in a light module (``client/commands.py``
and its siblings import nothing heavy), which also defines the command's flags; its
``run`` is a :func:`deferred` reference into the module that does the work. So
``fedcontrast --help`` and ``fedcontrast NAME --help`` import no torch or Flower, and
running NAME imports only NAME's code. ``run`` returns the exit status; raising :class:`UsageError`
(or ``ValueError`` / ``OSError`` from argument checking: a missing file, a directory
where a file belongs, a port in use) prints one line on stderr and exits with status 2,
without a traceback; so does a malformed flag (:class:`OneLineErrorParser`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from common import __version__
from common.errors import UsageError

ENTRY_POINT_GROUP = "fedcontrast.commands"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default after its help, unless the help already says what it is
    (``(default: ...)``) or there is none to show (``None``: the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default is None:
            return text
        return super()._get_help_string(action)

    def add_usage(self, usage, actions, groups, prefix=None) -> None:
        """A usage line of what must be given (positionals, required flags) and
        ``[options]`` for the rest, which the groups below list."""
        if usage is None:
            needed = [a for a in actions if a.required or not a.option_strings]
            words = [a.option_strings[0] + " " + self._metavar(a) if a.option_strings
                     else self._metavar(a) for a in needed]
            usage = " ".join(["%(prog)s", "[options]", *words])
        super().add_usage(usage, actions, groups, prefix)

    def _metavar(self, action: argparse.Action) -> str:
        return action.metavar or (action.dest if not action.option_strings else action.dest.upper())


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2, as
    :func:`main` reports a :class:`UsageError` (argparse's own prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def port_number(text: str) -> int:
    """An argparse ``type``: a TCP port, 0 to 65535 (0: the system picks a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


class CommandUnavailable(UsageError):
    """A command's module cannot be imported (a missing optional dependency, say)."""


@dataclass(frozen=True)
class deferred:  # noqa: N801 - used like a function: deferred("pkg.module:name")
    """A callable standing for ``module:name``, imported on the first call.

    Import failures become :class:`CommandUnavailable`, so one broken command
    (a missing optional dependency) does not break the others.
    """

    target: str

    def __call__(self, *args, **kwargs):
        module, _, name = self.target.partition(":")
        try:
            function = getattr(importlib.import_module(module), name)
        except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
            raise CommandUnavailable(
                f"cannot load {self.target}: {type(exc).__name__}: {exc} "
                "(is the installation complete? try `make setup`)"
            ) from exc
        return function(*args, **kwargs)


@dataclass(frozen=True)
class Command:
    """One ``fedcontrast`` subcommand.

    Attributes:
        name: what the user types (``train-local``).
        help: one line for ``fedcontrast --help``.
        add_arguments: adds the subcommand's flags to its parser.
        run: does the work; returns the process exit status.
        description: longer text for ``fedcontrast NAME --help`` (defaults to ``help``).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


def discover_commands(only: str | None = None) -> dict[str, Command]:
    """Load every command registered under :data:`ENTRY_POINT_GROUP`, sorted by name;
    with ``only`` naming a registered command, load that one alone (each command's module
    brings torch and more, ~2 s together; the full list is for ``fedcontrast --help``).

    A command whose module fails to import is still listed; running it reports the
    import error (a missing optional dependency should not break the other commands).
    """
    commands: dict[str, Command] = {}
    registered = list(entry_points(group=ENTRY_POINT_GROUP))
    if any(ep.name == only for ep in registered):
        registered = [ep for ep in registered if ep.name == only]
    for ep in registered:
        try:
            command = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
            commands[ep.name] = _unavailable(ep.name, ep.value, exc)
            continue
        if not isinstance(command, Command) or command.name != ep.name:
            raise TypeError(f"entry point {ep.name!r} ({ep.value}) is not a Command named {ep.name!r}")
        commands[command.name] = command
    return dict(sorted(commands.items()))


def _unavailable(name: str, target: str, exc: Exception) -> Command:
    message = f"cannot load {target}: {type(exc).__name__}: {exc}"
    return Command(name=name, help=f"(unavailable: {message})", add_arguments=lambda p: None,
                   run=_raiser(CommandUnavailable(
                       message + " (is the installation complete? try `make setup`)")))


def _raiser(error: Exception) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        raise error

    return run


def build_parser(commands: dict[str, Command] | None = None, *,
                 arguments: bool = True) -> argparse.ArgumentParser:
    """The ``fedcontrast`` parser with a subparser per command. ``arguments=False``
    leaves out the commands' own flags (and the imports they need): enough for the
    top-level help, which lists only names and help lines."""
    commands = discover_commands() if commands is None else commands
    parser = OneLineErrorParser(
        prog="fedcontrast",
        description="Federated contrastive learning with a global queue of negatives.",
    )
    parser.add_argument("--version", action="version", version=f"fedcontrast {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more log output (-v: info from libraries, -vv: debug)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands.values():
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=DefaultsHelpFormatter,
        )
        run = command.run
        if arguments:
            try:
                command.add_arguments(p)
            except CommandUnavailable as exc:  # still listed; running it says why
                run = _raiser(exc)
        p.set_defaults(_run=run)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Our own progress is INFO; show it by default, keep libraries quieter.
    for name in ("common", "client", "server", "simulations"):
        logging.getLogger(name).setLevel(min(level, logging.INFO))


def _named_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first token that is no top-level option
    (``--version``, ``-v``, ``-h``: none takes a value)."""
    return next((token for token in argv if not token.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _named_command(argv)
    # Load what the command line needs: nothing for --version, one command's module when it
    # names one; the top-level help needs only the names and help lines.
    commands = {} if name is None and "--version" in argv else discover_commands(only=name)
    parser = build_parser(commands, arguments=name in commands)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose)
    try:
        return int(args._run(args) or 0)
    except (UsageError, ValueError, OSError) as exc:
        print(f"fedcontrast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedcontrast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # `python -m common.runtime.cli` runs this file as __main__; delegate to the imported module so
    # entry points compare against the same Command class.
    from common.runtime.cli import main as _main

    sys.exit(_main())
