"""The `dvd` command line: the top layer, importing the servers, the planner and the benchmarks; nothing imports it."""
