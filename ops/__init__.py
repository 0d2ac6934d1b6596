"""Operations: runtime (config, assembly, telemetry), CLI, benchmarks, evaluation, demo, local stack, deploy files."""
