"""Ingest: validates first-party events and appends them to the log."""
