"""The `dvd` command line."""
