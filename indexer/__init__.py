"""Domain core: segmentation, embedding, stores, hybrid search. No Celery or Kafka here."""
