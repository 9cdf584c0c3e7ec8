"""Tools that run the orchestrator's own processes on one machine: the process helpers
(a private ``redis-server``, Celery workers and beat, supervised children, bounded waits)
that the pytest plugin, the test suite and the benchmarks drive, ``orchestrator demo``
(every example flow on real workers) and ``orchestrator dev`` (the whole stack, supervised,
in one command). Nothing in the package below these tools imports them except the
``demo`` and ``dev`` commands of the CLI, when they run.
"""
