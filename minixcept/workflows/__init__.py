"""Workflows on top of the three wings: training loops, feature extraction, fine-tuning, plots."""
