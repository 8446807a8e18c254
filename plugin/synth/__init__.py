"""Synthetic radiotherapy clinic with ground truth (tests, demo, benchmarks)."""
