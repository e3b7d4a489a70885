"""anomaseg: unsupervised anomaly segmentation in medical images.

Train a generative model on healthy scans, turn what it cannot explain into a per-voxel anomaly map
and a lesion segmentation, and evaluate both against ground truth.
"""

__version__ = "0.1.0"
