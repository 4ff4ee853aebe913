"""Helpers for the tests only (the product never imports them; tests/test_layers.py checks): in-process
training, tiny OneVision configs, synthetic VLA and chunk samples."""
