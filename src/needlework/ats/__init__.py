"""Attention sampling (Katharopoulos & Fleuret, ICML 2019) as pure tensor operators.

Pipeline: attention logits on a low-resolution view → :func:`attention_from_logits` → :func:`sample`
positions → :func:`cells_to_offsets` (attention cell → high-resolution patch corner) →
:func:`extract_patches` → features → :func:`expectation` (unbiased value *and* gradients).
:func:`nested_expectation` composes the estimator over more than two resolutions.
"""

from needlework.ats.expectation import ESTIMATORS, expectation, remaining_mass
from needlework.ats.mapping import cells_to_offsets
from needlework.ats.multilevel import nested_expectation
from needlework.ats.sampling import attention_from_logits, entropy, entropy_regulariser, sample
from needlework.ops.patches import extract_patches, extract_patches_1d, extract_patches_3d, extract_patches_nd

__all__ = [
    "ESTIMATORS",
    "attention_from_logits",
    "cells_to_offsets",
    "entropy",
    "entropy_regulariser",
    "expectation",
    "extract_patches",
    "extract_patches_1d",
    "extract_patches_3d",
    "extract_patches_nd",
    "nested_expectation",
    "remaining_mass",
    "sample",
]
