"""Vision features: the DINOv2 encoder and content-addressed feature extraction per shard."""
