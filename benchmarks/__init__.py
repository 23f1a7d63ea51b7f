"""Speed and accuracy harness, FLOP models and pytest-benchmark suites (see README.md)."""
