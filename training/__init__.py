"""Training, evaluation and publishing for the MNIST MLP (imports the model from ``app.model``).

Training runs ~235 small parallel regions per epoch (256-row matmuls and their element-wise
neighbours). With OpenMP's default passive waiting, the second thread goes to sleep between
them and each wake-up costs more than the work it joins: spinning instead makes epochs ~40 %
faster on a 2-core machine. OpenMP reads this once, when torch loads, so it is set here, before
any training module imports torch; an explicit OMP_WAIT_POLICY in the environment still wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
