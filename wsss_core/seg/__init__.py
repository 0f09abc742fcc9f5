"""Segmentation training on pseudo masks, and (multi-scale, flip, CRF) inference."""
