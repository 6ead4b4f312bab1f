"""Checkpoint formats: each module writes and reads one layout."""
