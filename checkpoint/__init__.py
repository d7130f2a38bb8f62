"""InternVL3.5 model geometry, checkpoint formats and the tiny-checkpoint generator."""
