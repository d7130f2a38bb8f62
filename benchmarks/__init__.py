"""`dvd bench` and the measurement scripts: workloads, load generation, metrics, DvD against coupled serving,
stage profiles for the planner. Above the planner and the servers it measures; only the command line imports it."""
