"""Tools that operate on trained MoE models: upcycling, merging/compression, bit-nested quantization."""
