"""Capacity planning: stage profiles, workloads, and a simulation of DvD splits against coupled serving."""
