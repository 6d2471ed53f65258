"""Release: the release folder and model card, quantization report and inference."""
