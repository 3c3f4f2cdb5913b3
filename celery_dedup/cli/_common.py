"""What every ``dedup`` command shares: exit codes, options and output.

The option groups of ``--help`` come in the order the options are declared
(:class:`celery.bin.base.CeleryCommand`), so every command declares its
options in one order: first its own, under ``"<Command> Options"`` (such as
``"Release Options"``); then the shared lookup options of the key commands
(:data:`LOOKUP_GROUP`); then the output options (:data:`OUTPUT_GROUP`, that is
:func:`json_option`). Celery's ``Options`` (``--help``) come last.

The argument of ``inspect`` and ``release`` (:func:`target_argument`) is
listed first, under :data:`ARGUMENTS_GROUP`, on every click version (click
8.5.1 began listing arguments, and Celery would put them under ``Options``);
the command's docstring describes it in full.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click
from celery.bin.base import CeleryOption
from celery.exceptions import CeleryCommandException

from ..exceptions import ConfigurationError

#: ``dedup check`` found a problem (EX_UNAVAILABLE, 69: no worker answered).
EX_PROBLEMS = 1
#: ``inspect`` found nothing, or ``release`` refused or released nothing.
EX_REFUSED = 1
#: A setting the command needs is missing or invalid (sysexits' EX_CONFIG).
EX_CONFIG = 78

#: The argument of ``inspect`` and ``release``: before every option group.
ARGUMENTS_GROUP = "Arguments"
#: The ``--timeout`` and ``--no-workers`` of ``status`` and ``inspect``.
LOOKUP_GROUP = "Lookup Options"
#: ``--json``: after the other groups.
OUTPUT_GROUP = "Output Options"

F = TypeVar("F", bound=Callable[..., Any])


def option(*decls: str, group: str, **attrs: Any) -> Callable[[F], F]:
    """A ``click.option`` listed under the heading ``group`` in ``--help``."""
    return click.option(*decls, cls=CeleryOption, help_group=group, **attrs)


class _Argument(click.Argument):
    """A click argument with a help row under :data:`ARGUMENTS_GROUP`."""

    help_group = ARGUMENTS_GROUP

    def __init__(self, *decls: Any, help_text: str, **attrs: Any) -> None:
        super().__init__(*decls, **attrs)
        self.help_text = help_text

    def get_help_record(self, ctx: click.Context) -> tuple[str, str]:
        return str(self.metavar), self.help_text  # set by target_argument


def target_argument() -> Callable[[F], F]:
    """``KEY_OR_TASK_ID``, the argument of ``inspect`` and ``release``."""
    return click.argument(
        "target",
        metavar="KEY_OR_TASK_ID",
        cls=_Argument,
        help_text="A dedup key, one of its Redis key names, or a task id.",
    )


def json_option() -> Callable[[F], F]:
    """``-j``/``--json`` under :data:`OUTPUT_GROUP`, passed to the command as
    ``as_json``; declared after the command's other options."""
    return option(
        "-j",
        "--json",
        "as_json",
        is_flag=True,
        group=OUTPUT_GROUP,
        help="Print one JSON object instead of text.",
    )


def echo_json(document: Any) -> None:
    """Print the ``--json`` output of a command."""
    click.echo(json.dumps(document, indent=2))


@contextlib.contextmanager
def json_errors(as_json: bool, document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield ``document``, the command's ``--json`` output, for the command to
    fill in as it goes. If the command fails with a message and an exit code
    (a refusal, an outage, a bad setting), print it with that message as its
    ``"error"`` when ``as_json``: a script gets JSON on every outcome."""
    document.setdefault("error", None)
    try:
        yield document
    except click.ClickException as exc:
        if as_json:
            echo_json({**document, "error": exc.format_message()})
        raise


@contextlib.contextmanager
def configuration_errors() -> Iterator[None]:
    """Exit with EX_CONFIG, naming the setting, when one is missing or invalid."""
    try:
        yield
    except ConfigurationError as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_CONFIG) from exc
