"""The outbox and relay built from an app's ``dedup_outbox_*`` settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery

from celery_dedup import ConfigurationError
from celery_dedup.outbox import Outbox, Relay

pytestmark = pytest.mark.outbox


def make_app(**conf: object) -> Celery:
    app = Celery("outbox-settings", set_as_current=False)
    app.conf.update(broker_url="memory://", **conf)
    return app


def test_the_outbox_is_built_once_per_app(tmp_path: Path) -> None:
    app = make_app(
        dedup_outbox_url=f"sqlite:///{tmp_path / 'o.db'}",
        dedup_outbox_table="events",
        dedup_outbox_exchange="proj.events",
    )
    outbox = Outbox.from_app(app)
    assert Outbox.from_app(app) is outbox
    assert outbox.table_name == "events"
    assert outbox.fence_table.name == "events_fence"
    relay = Relay.from_app(app, batch_size=5)
    assert relay.outbox is outbox
    assert (relay.exchange.name, relay.exchange.type) == ("proj.events", "topic")
    assert relay.batch_size == 5
    relay.close()
    outbox.close()


def test_the_outbox_url_is_required() -> None:
    with pytest.raises(ConfigurationError) as info:
        Outbox.from_app(make_app())
    assert info.value.setting == "dedup_outbox_url"


def test_a_table_name_too_long_names_the_setting() -> None:
    app = make_app(dedup_outbox_url="sqlite://", dedup_outbox_table="t" * 60)
    with pytest.raises(ConfigurationError) as info:
        Outbox.from_app(app)
    assert info.value.setting == "dedup_outbox_table"
