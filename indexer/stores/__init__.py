"""Storage backends behind the protocols of ``indexer.stores.base``."""
