"""The `cdp` command: run the whole suite on one machine, and its demo."""
