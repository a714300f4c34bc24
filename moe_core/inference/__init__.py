"""Inference-time MoE tools: self-contrast decoding, test-time re-mixing, expert offloading."""
