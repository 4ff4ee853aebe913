"""Upstream registration, the dataset, the trainer, the sparse head and LoRA."""
