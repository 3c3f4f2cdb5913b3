"""Settings of the example project: every service from an environment
variable, with a default on this machine's loopback."""

import os

env = os.environ.get

SECRET_KEY = env("DJANGO_SECRET_KEY", "not-a-secret: the example only")
DEBUG = env("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = ["orders"]
MIDDLEWARE = ["django.middleware.csrf.CsrfViewMiddleware"]
ROOT_URLCONF = "proj.urls"
TEMPLATES = [
    {"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}
]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": env("POSTGRES_HOST", "127.0.0.1"),
        "PORT": env("POSTGRES_PORT", "5432"),
        "USER": env("POSTGRES_USER", "postgres"),
        "PASSWORD": env("POSTGRES_PASSWORD", ""),
        "NAME": env("POSTGRES_DB", "test"),
        # `manage.py test` creates (and drops) this one: test_<NAME> by default.
        "TEST": {"NAME": env("POSTGRES_TEST_DB") or None},
    }
}

# Celery, through app.config_from_object("django.conf:settings",
# namespace="CELERY"): each setting's name in capitals, prefixed CELERY_.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_TASK_DEFAULT_QUEUE", "celery")
# celery-dedup's settings are spelled the same way: dedup_redis_url is
# CELERY_DEDUP_REDIS_URL (it defaults to the broker when that is Redis).
CELERY_DEDUP_REDIS_URL = env("CELERY_DEDUP_REDIS_URL", CELERY_BROKER_URL)
CELERY_DEDUP_KEY_PREFIX = env("CELERY_DEDUP_KEY_PREFIX", "dedup")
CELERY_DEDUP_TTL = 600  # a claim outlives a queued task by 10 minutes at most
# The outbox: its rows are written through Django's connection (see
# orders/tasks.py); the relay reads them through this URL.
CELERY_DEDUP_OUTBOX_URL = env(
    "CELERY_DEDUP_OUTBOX_URL",
    "postgresql+psycopg://{USER}@{HOST}:{PORT}/{NAME}".format(**DATABASES["default"]),
)
CELERY_DEDUP_OUTBOX_TABLE = "orders_outbox"
CELERY_DEDUP_OUTBOX_EXCHANGE = "orders.events"
CELERY_DEDUP_OUTBOX_RELAY = env("CELERY_DEDUP_OUTBOX_RELAY", "0") == "1"
