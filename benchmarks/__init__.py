"""`dvd bench` and the measurement tools, in two layers: `toolkit/`, the base they share (workloads, load
generation, metrics, servers, placement, result documents), and one thin module per tool above it. Above the
planner and the servers it measures; only the command line imports it."""
