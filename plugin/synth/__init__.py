"""Test and demo support, not runtime: a synthetic radiotherapy clinic with ground truth (tests, demo,
benchmarks, ``rtharvest-synth``) and ``simulation``, an in-memory source driving the planner to a fixpoint.

The plugin never imports this package at run time.
"""
