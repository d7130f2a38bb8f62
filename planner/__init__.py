"""Capacity planning: stage profiles (measured, or derived from a model's geometry and a GPU's data sheet), a
simulation of DvD splits, coupled vLLM and vLLM's encoder disaggregation down to vLLM's scheduler, and sustained
goodput as the figure they are compared by; it needs only the model shapes (`checkpoint`) and the tiling rule
(`vision_server.preprocess`), and the benchmarks validate it."""
