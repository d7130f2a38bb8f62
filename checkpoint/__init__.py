"""InternVL3.5 model geometry, checkpoint formats and the tiny-checkpoint generator; read by both servers and the
planner, it imports no other package of the project."""
