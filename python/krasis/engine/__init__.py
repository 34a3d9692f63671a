"""Execution: loaded weights, the KV cache, the forward pass and generation."""
