"""What several methods share (not a method: the registry imports nothing from here by itself)."""
