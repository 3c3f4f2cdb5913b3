"""The tables: named constraints, per-dialect indexes, and no SQLAlchemy import
for users of the core package."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from celery_dedup import ConfigurationError
from celery_dedup.outbox import Inbox, Outbox
from tests.integration import outbox_fixtures
from tests.integration.outbox_fixtures import Database
from tests.rig import ROOT

pytestmark = pytest.mark.outbox
sqlite_db = outbox_fixtures.sqlite_db


def test_every_constraint_and_index_is_named(sqlite_db: Database) -> None:
    name = sqlite_db.outbox.table_name
    inspector = sa.inspect(sqlite_db.engine)
    assert inspector.get_pk_constraint(name)["name"] == f"pk_{name}"
    assert {u["name"] for u in inspector.get_unique_constraints(name)} == {
        f"uq_{name}_event_id",
        f"uq_{name}_event",
    }
    assert {i["name"] for i in inspector.get_indexes(name)} == {
        f"ix_{name}_pending",
        f"ix_{name}_aggregate",
        f"ix_{name}_published",
    }
    assert {c["name"] for c in inspector.get_check_constraints(name)} == {
        f"ck_{name}_state"
    }
    assert inspector.get_pk_constraint(f"{name}_fence")["name"] == f"pk_{name}_fence"
    columns = {c["name"] for c in inspector.get_columns(name)}
    assert {
        "id",
        "event_id",
        "event_type",
        "aggregate_id",
        "payload",
        "headers",
        "fence_key",
        "fence_token",
        "task_id",
        "created_at",
        "state",
        "attempts",
        "next_attempt_at",
        "claim_token",
        "claimed_at",
        "published_at",
        "last_error",
    } <= columns


def test_the_state_check_rejects_unknown_states(sqlite_db: Database) -> None:
    with sqlite_db.engine.begin() as conn:
        sqlite_db.outbox.add(conn, "A", aggregate_id="1")
    table = sqlite_db.outbox.table
    with pytest.raises(sa.exc.IntegrityError), sqlite_db.engine.begin() as conn:
        conn.execute(sa.update(table).values(state="lost"))


def index_ddl(outbox: Outbox, dialect: sa.engine.Dialect) -> dict[str, str]:
    return {
        str(index.name): str(CreateIndex(index).compile(dialect=dialect))
        for index in outbox.table.indexes
    }


def test_partial_indexes_where_the_dialect_has_them() -> None:
    outbox = Outbox(table_name="events")
    pg = index_ddl(outbox, postgresql.dialect())
    assert "WHERE state = 'pending'" in pg["ix_events_pending"]
    assert "(aggregate_id, state, id)" in pg["ix_events_aggregate"]
    assert "WHERE published_at IS NOT NULL" in pg["ix_events_published"]
    my = index_ddl(outbox, mysql.dialect())
    assert "WHERE" not in "".join(my.values())
    assert "(state, id)" in my["ix_events_pending"]
    assert "(aggregate_id, state, id)" in my["ix_events_aggregate"]


def test_mysql_timestamps_keep_microseconds() -> None:
    ddl = str(
        CreateTable(Outbox(table_name="events").table).compile(dialect=mysql.dialect())
    )
    assert "created_at DATETIME(6) NOT NULL" in ddl
    assert "fence_token BIGINT" in ddl


def test_the_tables_join_the_metadata_given() -> None:
    metadata = sa.MetaData()
    Outbox(table_name="events", metadata=metadata)
    Inbox(table_name="seen", metadata=metadata)
    assert set(metadata.tables) == {"events", "events_fence", "seen"}


@pytest.mark.parametrize("name", ["", "1abc", "bad-name", "x; drop", "x" * 49, None])
def test_table_names_are_checked(name: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        Outbox(table_name=name)  # type: ignore[arg-type]
    assert info.value.setting == "table_name"


def test_engine_arguments_are_checked() -> None:
    with pytest.raises(ConfigurationError) as info:
        Outbox(42)  # type: ignore[arg-type]
    assert info.value.setting == "engine_or_url"
    engine = sa.create_engine("sqlite://")
    with pytest.raises(ConfigurationError) as info:
        Outbox(engine, engine_options={"echo": True})
    assert info.value.setting == "engine_options"
    engine.dispose()


def test_importing_the_core_package_does_not_import_sqlalchemy() -> None:
    code = (
        "import sys, celery_dedup, celery_dedup.outbox, celery_dedup.outbox.worker\n"
        "assert 'sqlalchemy' not in sys.modules, 'sqlalchemy was imported'\n"
        "from celery_dedup.outbox import Outbox\n"
        "assert 'sqlalchemy' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
