"""DMP bridge: hashed audience export and conversion re-import."""
