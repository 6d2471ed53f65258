"""Dagster resources: settings, experiment tracking (W&B, codecarbon) and the Hub."""
