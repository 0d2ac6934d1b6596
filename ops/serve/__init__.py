"""The HTTP API (`tessera serve`), its API keys and the search page."""
