"""Whole-slide images: read, segment, tile, embed, heatmaps, synthetic slides and needle crops.

Python API (the ``needlework slides`` command wraps it):

* :func:`open_slide` — OpenSlide with tiffslide fallback; ``slide.mpp``, ``slide.read_region_at``;
* :func:`segment_tissue`, :func:`tile_slide` with :class:`TilingConfig` / :class:`TissueParams`;
* :func:`run_tiling`, :func:`run_embedding` — resumable jobs over a folder (``ray_address`` to shard);
* :func:`embed_tiles` — a DataLoader over one slide's tiles into an encoder;
* :func:`export_heatmap` — PNG / h5 / top-k tiles / QuPath GeoJSON from per-tile scores;
* :func:`make_synthetic_cohort` — pyramidal BigTIFFs with planted lesions for tests and demos.
"""

from needlework._lazy import lazy_module_getattr

# resolved on first use: tiling must not import torch (the embedding job does)
_EXPORTS = {
    "ArrayReader": "needlework.slides.reader",
    "EmbedJobConfig": "needlework.slides.embed_job",
    "MissingMPPError": "needlework.slides.mpp",
    "SlideJobError": "needlework.slides.stage_runner",
    "SlideOpenError": "needlework.slides.reader",
    "SlideReader": "needlework.slides.reader",
    "SyntheticSlideSpec": "needlework.slides.synthetic",
    "TileJobConfig": "needlework.slides.jobs",
    "TilingConfig": "needlework.slides.tiling",
    "TissueParams": "needlework.slides.tissue",
    "embed_tiles": "needlework.slides.embed",
    "export_heatmap": "needlework.slides.heatmap_export",
    "list_slides": "needlework.slides.reader",
    "load_mpp_overrides": "needlework.slides.mpp",
    "make_synthetic_cohort": "needlework.slides.synthetic",
    "make_synthetic_slide": "needlework.slides.synthetic",
    "open_slide": "needlework.slides.reader",
    "resolve_mpp": "needlework.slides.mpp",
    "run_embedding": "needlework.slides.embed_job",
    "run_tiling": "needlework.slides.jobs",
    "scores_from_model": "needlework.slides.heatmap_export",
    "segment_tissue": "needlework.slides.tissue",
    "tile_slide": "needlework.slides.tiling",
}
__getattr__, __dir__ = lazy_module_getattr(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
