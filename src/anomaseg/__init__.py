"""anomaseg: unsupervised anomaly segmentation in medical images.

Train a generative model on healthy scans, turn what it cannot explain into a per-voxel anomaly map
and a lesion segmentation, and evaluate both against ground truth.
"""

import os

# Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise). OpenMP reads the
# policy once, when torch loads, so it is set here, for the command and for scripts that import
# anomaseg before torch: on a machine shared with other work, spinning threads made a 2-thread
# training step 4.5x slower (benchmarks/bench_threads.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
