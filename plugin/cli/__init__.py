"""Command lines: the `rtharvest` command (commands), its helpers (util) and the demo."""
