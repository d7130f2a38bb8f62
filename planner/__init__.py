"""Capacity planning: stage profiles, workloads, and a simulation of DvD splits against coupled serving; it
needs only the model geometry (`checkpoint`), and the benchmarks validate it."""
