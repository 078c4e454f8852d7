"""Plumbing shared by every CDP service: settings, logging, the event log, the store, gRPC."""
