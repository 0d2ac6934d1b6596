"""Retrieval quality on LoCoMo-style dialogues: `make eval` (retrieval) and `make eval-dialogue`."""
