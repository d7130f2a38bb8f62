"""Protocol buffers: control plane services and the feature frame header."""
