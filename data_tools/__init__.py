"""Data tools: download, convert and mix Open X-Embodiment RLDS datasets."""
