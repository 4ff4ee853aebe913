"""Demos, their tiny model and RLDS fixture builders, and the simulator task."""
