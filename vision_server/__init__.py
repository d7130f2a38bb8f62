"""Vision server: InternViT + MLP projector, batched, sending features to language servers; it imports neither
the language server nor the gateway, only the shared packages below it."""
