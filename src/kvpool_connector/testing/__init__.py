"""Helpers that tests, the demo and the benchmarks share: a local random-weight model and a local Mooncake pool."""
