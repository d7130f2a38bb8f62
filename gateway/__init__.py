"""OpenAI-compatible gateway in front of the vision and language servers; it reaches them over gRPC only and
imports none of their code, only what they share (`contracts`, `proto`)."""
