"""`pigeon bench`: load generator, scenarios, measurements and plots.

Entry point: `pigeon.bench.runner` (wired into `pigeon bench` by `pigeon.cli`).
"""
