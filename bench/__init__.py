"""Benchmarks of perfex-webhooks (not part of the test suite; results in docs/performance.md)."""
