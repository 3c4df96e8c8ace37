"""``python -m memkern.cli``: the same as the ``memkern`` console script."""
from memkern.cli.main import main

main()
