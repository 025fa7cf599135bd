"""Training, evaluation and publishing for the MNIST MLP (through ``app.registry`` only).

Training runs ~235 small parallel regions per epoch (256-row matmuls and their element-wise
neighbours). With OpenMP's default passive waiting, the second thread goes to sleep between
them and each wake-up costs more than the work it joins: spinning instead makes epochs ~40 %
faster on a 2-core machine. OpenMP reads OMP_WAIT_POLICY once, when torch's OpenMP runtime
loads, so it is set here for that moment only: torch is imported with it, then it is removed
again so that processes this one starts (a test's server, say) do not inherit a spinning
policy. An explicit OMP_WAIT_POLICY in the environment wins and is left alone; when torch was
imported before this package, nothing changes.
"""

import os
import sys

TRAIN_EXTRA_HINT = "training needs the 'train' extra: pip install -e '.[train]' (make train and make test install it)"


def missing_extra(exc: ModuleNotFoundError) -> ModuleNotFoundError:
    """The error for a training dependency a serving-only install does not have."""
    package = (exc.name or "a training dependency").partition(".")[0]
    return ModuleNotFoundError(f"{package} is not installed: {TRAIN_EXTRA_HINT}", name=package)


if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    try:
        import torch  # noqa: F401 - loads the OpenMP runtime, which reads the policy now
    finally:
        del os.environ["OMP_WAIT_POLICY"]
