"""The ``evpl`` command line: perf, info."""
