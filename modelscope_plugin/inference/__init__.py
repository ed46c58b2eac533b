"""Inference: image loading and preprocessing, the network run, post-processing into the output contract."""
