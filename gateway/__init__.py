"""OpenAI-compatible gateway in front of the vision and language servers."""
