"""Layer retraining (docs/method.md, Experiment 3): the algorithm (``algorithm``) and the runner
that owns the run directory (``run``)."""
