"""Language server: vLLM in embedding-only mode, fed image features by the vision server; it imports neither
the vision server nor the gateway, only the shared packages below it."""

from language_server import torch_compat  # noqa: F401  (must precede any vLLM/transformers import)
