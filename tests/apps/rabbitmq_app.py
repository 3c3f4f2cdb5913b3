"""The scenario app on a RabbitMQ broker, for ``tests/scenarios/test_rabbitmq.py``.

Its tasks are :mod:`tests.apps.scenario_app`'s. The rig gives the workers the
broker in ``CELERY_BROKER_URL``, Celery's own override of ``broker_url``;
results, dedup keys and the recorder stay on the rig's Redis. A worker names
its broker connections after itself (``connection_name``, which
``rabbitmqctl list_connections client_properties`` shows), so that a test can
close them. Each delivery that reaches a process is also recorded with
RabbitMQ's ``redelivered`` flag, the worker that got it and when, in the list
``deliveries:<task>``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from celery.signals import celeryd_init, task_prerun

from tests.apps.scenario_app import _recorder, app

__all__ = ["app"]


@celeryd_init.connect
def _name_connections(sender: str = "", conf: Any = None, **_: Any) -> None:
    """Before the worker connects: tag each of its connections with its name."""
    options = dict(conf.broker_transport_options or {})
    options["client_properties"] = {"connection_name": sender}
    conf.broker_transport_options = options


@task_prerun.connect
def _delivery(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    info = task.request.delivery_info or {}
    entry = {
        "task_id": task_id,
        "redelivered": bool(info.get("redelivered")),
        "hostname": task.request.hostname,
        "at": time.time(),
    }
    name = task.name.rsplit(".", 1)[-1]
    _recorder["client"].rpush(f"deliveries:{name}", json.dumps(entry))
