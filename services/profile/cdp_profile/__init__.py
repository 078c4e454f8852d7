"""Profile: projects the single customer view from resolved events."""
