"""Feature wire format and transports shared by the vision and language servers; below both, above `proto` only."""
