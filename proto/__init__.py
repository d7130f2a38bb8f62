"""Protocol buffers: the control-plane services and the feature frame header; the bottom layer, importing nothing."""
