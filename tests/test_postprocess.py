import numpy as np
import pytest
from scipy import ndimage

from anomaseg.postprocess import PostProcessor, median_filter_3d, remove_small_components


def test_parallel_median_equals_scipy():
    vol = np.random.default_rng(0).random((20, 18, 41)).astype(np.float32)
    np.testing.assert_array_equal(median_filter_3d(vol, 5, threads=2),
                                  ndimage.median_filter(vol, size=5, mode="nearest"))


def test_smooth_removes_isolated_spikes_and_masks_eroded_border():
    brain = np.zeros((30, 30, 30), bool)
    brain[5:25, 5:25, 5:25] = True
    amap = np.zeros(brain.shape, np.float32)
    amap[15, 15, 15] = 10.0  # a single hot voxel: removed by the median
    amap[10:16, 10:16, 10:16] = 1.0  # a blob: survives
    amap[5, 12, 12] = 5.0  # at the brain's border: masked by the erosion
    out = PostProcessor(median_size=3, erosion=2).smooth(amap, brain)
    assert out[15, 15, 15] < 10 and out[12, 12, 12] == 1.0
    assert out[5, 12, 12] == 0 and out[~brain].max() == 0


def test_threshold_is_the_healthy_quantile():
    rng = np.random.default_rng(0)
    maps = [(rng.random((10, 10, 10)).astype(np.float32), np.ones((10, 10, 10), bool)) for _ in range(3)]
    post = PostProcessor(healthy_fpr=0.05).fit(maps)
    flagged = np.mean(np.concatenate([m[b] for m, b in maps]) > post.threshold_)
    assert abs(flagged - 0.05) < 1e-3
    with pytest.raises(ValueError):
        PostProcessor(healthy_fpr=0)


def test_small_components_are_dropped():
    seg = np.zeros((20, 20, 20), bool)
    seg[2:4, 2:4, 2:4] = True  # 8 voxels
    seg[10, 10, 10:17] = True  # 7 voxels
    seg[15, 15, 15] = True  # 1 voxel, touching nothing
    out = remove_small_components(seg, 8)
    assert out[2:4, 2:4, 2:4].all() and not out[10, 10].any() and not out[15, 15, 15]
    post = PostProcessor(min_component_size=8)
    post.threshold_ = 0.5
    assert post.segment(seg.astype(np.float32)).sum() == 8


def test_2d_images_get_in_plane_erosion_and_median():
    brain = np.ones((20, 20, 1), bool)
    amap = np.zeros((20, 20, 1), np.float32)
    amap[8:12, 8:12, 0] = 1.0
    post = PostProcessor(median_size=3, erosion=2)
    eroded = post.eroded(brain)
    assert eroded[2:18, 2:18, 0].all() and not eroded[:2].any()  # the single slice survives
    out = post.smooth(amap, brain)
    np.testing.assert_array_equal(out[..., 0], np.where(eroded[..., 0], ndimage.median_filter(amap[..., 0], 3, mode="nearest"), 0))
