"""Sweeps, scaling fits and closed-loop reports."""
