"""Benchmarks (`make bench`, `tessera bench`), the soak test and the synthetic corpora they run on."""
