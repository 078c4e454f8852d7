"""Identity: resolves identifiers to persistent profiles, creating and merging them."""
