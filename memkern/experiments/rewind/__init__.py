"""Layer rewinding (docs/method.md, Experiment 2): the algorithm (``algorithm``) and the runner
that owns the run directory (``run``)."""
