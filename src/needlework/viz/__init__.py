"""Figures (matplotlib, Agg backend; PNGs written atomically).

* :mod:`needlework.viz.saliency` — image grids with saliency overlays, boxes and detected points.
* :mod:`needlework.viz.attention` — attention sampling: sampled patches, attention maps, the patches.
* :mod:`needlework.viz.mist` — MIST detections over the images, ground truth dashed.

The package imports nothing on its own, so ``import needlework.viz`` does not load matplotlib.
"""
