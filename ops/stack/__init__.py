"""The local stack: Redis, a Kafka-protocol broker, PostgreSQL, Celery workers and the consumer on loopback."""
