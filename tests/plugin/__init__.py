"""Tests of ``celery_dedup.testing``, the pytest plugin for users' tests."""
