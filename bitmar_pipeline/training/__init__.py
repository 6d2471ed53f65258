"""Training: the three stages, their datasets, reasoning targets and the torchrun launch."""
