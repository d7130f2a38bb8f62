"""Vision server: InternViT + MLP projector, batched, sending features to language servers."""
