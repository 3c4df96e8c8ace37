"""Tests that need torchvision and timm (the ``zoo`` extra) skip with a reason when absent."""
import importlib.util

import pytest

ZOO_MISSING = [m for m in ("torchvision", "timm") if importlib.util.find_spec(m) is None]
needs_zoo = pytest.mark.skipif(bool(ZOO_MISSING), reason=f"{' and '.join(ZOO_MISSING)} not "
                               f"installed: pip install 'memkern[zoo]' (see .ci/run)")
