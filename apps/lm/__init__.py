"""MoE language-model pretraining: tokenizers, token shards, a decoder-only MoE transformer (dense, top-k MoE,
DeepSeekMoE fine-grained + shared, Chain-of-Experts, EvoMoE, dynamic top-p, attention experts), the Lightning
task, the EvoMoE schedule callback and text generation."""
