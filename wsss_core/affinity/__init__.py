"""Affinity: labels from confident CAM regions, AffinityNet training pairs and loss, the random walk."""
