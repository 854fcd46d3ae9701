"""``modalign benchmark``: suites of tasks on model bundles with bootstrap intervals.

Data flow: :func:`~modalign.benchmark.suite.load_suite` (YAML + ``--set``) ->
:func:`~modalign.benchmark.run.run_benchmark` (one :class:`~.context.TaskContext` per model x
corpus; each task from :data:`~.tasks.TASKS` runs on it) -> ``report.json`` / ``report.md`` /
``plots/*.png``; :func:`~.render.write_leaderboard` merges reports under a folder.
"""
