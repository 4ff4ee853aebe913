"""Test helpers: synthetic RLDS/TFDS datasets built from real OXE feature schemas."""
