"""Celery app, queues and thin tasks over indexer (issue 3)."""
