"""Eviction quality: tasks, the runner that measures a configuration, the benchmark grid and its reports."""
