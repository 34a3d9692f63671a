"""The math of a decoder layer, written once: norms, RoPE, attention, routing, MLPs."""
