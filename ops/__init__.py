"""Operations: settings, CLI, metrics, benchmarks and evaluation."""
