"""The Celery app, configured from Django's settings (the CELERY_* ones)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

# task_cls is an argument of Celery(), not a setting: with
# CELERY_TASK_CLS=celery_dedup:DedupTask every task is a DedupTask, and the
# tasks that set a dedup_* option deduplicate.
app = Celery("proj", task_cls=os.environ.get("CELERY_TASK_CLS") or None)

# CELERY_BROKER_URL is broker_url, CELERY_DEDUP_KEY_PREFIX is dedup_key_prefix.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
