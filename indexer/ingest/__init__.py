"""Ingest: events into the conversation state, turns into fragments, fragments into the stores."""
