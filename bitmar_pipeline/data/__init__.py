"""Data stages: COCO sources (sample, local, download), image-caption alignment, robot task files."""
