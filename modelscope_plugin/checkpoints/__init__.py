"""Checkpoint files: reading without executing pickled code, strict loading, and one key table per source."""
