"""What every ``dedup`` command shares: exit codes, options and output."""

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

F = TypeVar("F", bound=Callable[..., Any])


def option(*decls: str, group: str, **attrs: Any) -> Callable[[F], F]:
    """A ``click.option`` listed under the heading ``group`` in ``--help``."""
    return click.option(*decls, cls=CeleryOption, help_group=group, **attrs)


def json_option(group: str) -> Callable[[F], F]:
    """``-j``/``--json``, passed to the command as ``as_json``."""
    return option(
        "-j",
        "--json",
        "as_json",
        is_flag=True,
        group=group,
        help="Print one JSON object instead of text.",
    )


def echo_json(document: Any) -> None:
    """Print the ``--json`` output of a command."""
    click.echo(json.dumps(document, indent=2))


@contextlib.contextmanager
def configuration_errors() -> Iterator[None]:
    """Exit with EX_CONFIG, naming the setting, when one is missing or invalid."""
    try:
        yield
    except ConfigurationError as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_CONFIG) from exc
