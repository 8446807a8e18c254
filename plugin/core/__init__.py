"""Pure harvest rules: what to fetch, how to classify and search; no I/O, no threads."""
