"""A project in Celery's standard layout, run as ``celery -A tests.apps.proj``.

``celery.py`` creates the app and names the task modules in ``imports``
without importing them, so ``-A`` alone does not register ``tasks.py``'s
tasks; a worker imports them (Celery's "Using Celery in your Application").
"""
