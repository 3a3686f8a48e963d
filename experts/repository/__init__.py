"""The repository: registry rows (SQL), artifacts on disk, jobs, and merges of registered experts."""
