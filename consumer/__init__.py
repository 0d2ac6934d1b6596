"""Kafka side: consumes the message and query topics and hands work to Celery (issue 3)."""
