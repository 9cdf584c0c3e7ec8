"""Benchmarks: the orchestrator against the same work written as plain Celery canvas.

``make bench`` (``python -m benchmarks.run``) starts its own redis-server and workers,
runs every scenario both ways with the same tasks, broker, workers and settings, and
writes ``benchmarks/results/latest.json`` and ``chart.png``. Not part of the test suite.
"""
