"""The outbox's tables (CELERY_DEDUP_OUTBOX_TABLE and its _fence table),
created by SQLAlchemy on the migration's own connection and transaction."""

from celery_dedup.django import sqlalchemy_connection
from celery_dedup.outbox import Outbox
from django.conf import settings
from django.db import migrations


def create_outbox(apps, schema_editor):
    outbox = Outbox(table_name=settings.CELERY_DEDUP_OUTBOX_TABLE)
    with sqlalchemy_connection(schema_editor.connection.alias) as conn:
        outbox.metadata.create_all(conn)


def drop_outbox(apps, schema_editor):
    outbox = Outbox(table_name=settings.CELERY_DEDUP_OUTBOX_TABLE)
    with sqlalchemy_connection(schema_editor.connection.alias) as conn:
        outbox.metadata.drop_all(conn)


class Migration(migrations.Migration):
    dependencies = [("orders", "0001_initial")]

    operations = [migrations.RunPython(create_outbox, drop_outbox)]
