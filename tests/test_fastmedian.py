import numpy as np
import pytest
from scipy import ndimage

from anomaseg.fastmedian import masked_median
from anomaseg.postprocess import PostProcessor, median_filter_3d, remove_small_components


def scipy_masked(volume, size, mask):
    return np.where(mask, ndimage.median_filter(volume, size=size, mode="nearest"), 0).astype(np.float32)


@pytest.mark.parametrize("shape,size", [((31, 26, 29), 5), ((17, 9, 12), 3), ((24, 20, 18), (5, 3, 1)),
                                        ((6, 5, 4), 7), ((40, 33, 1), (5, 5, 1)), ((23, 31, 1), (3, 3, 1))])
def test_masked_median_equals_scipy_on_random_volumes(shape, size):
    rng = np.random.default_rng(sum(shape))
    volume = rng.normal(size=shape).astype(np.float32)  # negative values, zeros and ties below too
    volume[rng.random(shape) < 0.1] = 0.0
    mask = rng.random(shape) < 0.6
    np.testing.assert_array_equal(masked_median(volume, size, mask), scipy_masked(volume, size, mask))


def test_masked_median_with_many_ties_and_a_crowded_bin():
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 3, (30, 28, 26)).astype(np.float32)  # 3 distinct values: bins hold many
    volume[10:20, 10:20, 10:20] = rng.random((10, 10, 10)) * 1e-6  # a cluster of close values
    mask = rng.random(volume.shape) < 0.8
    np.testing.assert_array_equal(masked_median(volume, 5, mask), scipy_masked(volume, 5, mask))


def test_masked_median_of_a_smooth_map_inside_a_brain():
    """What post-processing feeds it: a smooth map, non-zero inside an ellipsoid, masked by it."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (44, 52, 40)], indexing="ij")
    brain = x**2 + y**2 + z**2 < 0.8
    rng = np.random.default_rng(1)
    amap = np.where(brain, np.abs(np.sin(5 * x) * np.cos(3 * y)) + 0.05 * rng.random(brain.shape), 0)
    amap = amap.astype(np.float32)
    np.testing.assert_array_equal(masked_median(amap, 5, brain), scipy_masked(amap, 5, brain))


def test_masked_median_falls_back_to_scipy_for_nan_and_checks_its_input():
    rng = np.random.default_rng(2)
    volume = rng.random((12, 12, 12)).astype(np.float32)
    volume[0, 0, 0] = np.nan
    mask = np.zeros(volume.shape, bool)
    mask[4:8, 4:8, 4:8] = True
    np.testing.assert_array_equal(masked_median(volume, 3, mask), scipy_masked(volume, 3, mask))
    assert not masked_median(volume, 3, np.zeros_like(mask)).any()
    with pytest.raises(ValueError, match="odd"):
        masked_median(volume, 4, mask)
    with pytest.raises(ValueError, match="shape"):
        masked_median(volume, 3, mask[:-1])


def test_smooth_equals_the_scipy_pipeline():
    """PostProcessor.smooth (fast median on the eroded brain) == scipy's median on the whole volume,
    then zero outside the eroded brain: in 3D and for 2D (depth-1) images."""
    rng = np.random.default_rng(3)
    for shape in [(40, 46, 38), (50, 44, 1)]:
        x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        brain = (x**2 + y**2 + (z if shape[2] > 1 else 0 * z) ** 2) < 0.7
        amap = (rng.random(shape) * brain).astype(np.float32)
        post = PostProcessor(median_size=5, erosion=2)
        size = (5, 5, 1) if shape[2] == 1 else 5
        expected = np.where(post.eroded(brain), ndimage.median_filter(amap, size=size, mode="nearest"), 0)
        np.testing.assert_array_equal(post.smooth(amap, brain), expected)
    np.testing.assert_array_equal(median_filter_3d(amap, 5), ndimage.median_filter(amap, size=(5, 5, 1), mode="nearest"))


def test_small_components_equal_labelling_the_whole_volume():
    rng = np.random.default_rng(4)
    seg = ndimage.binary_opening(rng.random((40, 36, 30)) < 0.3) & (rng.random((40, 36, 30)) < 0.9)
    labels, n = ndimage.label(seg, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    for min_size in (2, 8, 30):
        expected = (sizes >= min_size)[labels] & seg
        np.testing.assert_array_equal(remove_small_components(seg, min_size), expected)
    corner = np.zeros((10, 10, 10), bool)
    corner[-3:, -3:, -3:] = True  # a component touching the volume's edge
    assert remove_small_components(corner, 27).sum() == 27 and not remove_small_components(corner, 28).any()


def test_the_median_leaves_the_thread_count_of_a_one_thread_process_alone():
    # numba's OpenMP layer used to raise the whole process to all cores on its first call
    import os
    import subprocess
    import sys

    code = ("import numpy as np, torch; from anomaseg.fastmedian import masked_median; "
            "v = np.random.rand(20, 20, 20).astype(np.float32); masked_median(v, 5, v > 0.2); "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"
