"""Segmentation quality assessment without ground truth (Zhou, Deng & Wu, MIDL 2020): REC-Net,
REG-Net and the candidate pool they are trained on. See `assessor.py` for fitting and predicting."""

from anomaseg.quality.assessor import QualityAssessor, QualityConfig, fit_quality
from anomaseg.quality.candidates import Candidate, find_candidates
from anomaseg.quality.networks import VARIANTS, QualityPipeline, RECNet, REGNet, volume_dice

__all__ = ["Candidate", "QualityAssessor", "QualityConfig", "QualityPipeline", "RECNet", "REGNet", "VARIANTS",
           "find_candidates", "fit_quality", "volume_dice"]
