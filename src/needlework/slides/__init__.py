"""Whole-slide images: read, segment, tile, embed, heatmaps, synthetic slides and needle crops.

Python API (the ``needlework slides`` command wraps it):

* :func:`open_slide` — OpenSlide with tiffslide fallback; ``slide.mpp``, ``slide.read_region_at``;
* :func:`segment_tissue`, :func:`tile_slide` with :class:`TilingConfig` / :class:`TissueParams`;
* :func:`run_tiling`, :func:`run_embedding` — resumable jobs over a folder (``ray_address`` to shard);
* :func:`embed_tiles` — a DataLoader over one slide's tiles into an encoder;
* :func:`export_heatmap` — PNG / h5 / top-k tiles / QuPath GeoJSON from per-tile scores;
* :func:`make_synthetic_cohort` — pyramidal BigTIFFs with planted lesions for tests and demos.
"""

from needlework.slides.embed import embed_tiles
from needlework.slides.embed_job import EmbedJobConfig, run_embedding
from needlework.slides.heatmap import export_heatmap, scores_from_model
from needlework.slides.jobs import SlideJobError, TileJobConfig, run_tiling
from needlework.slides.mpp import MissingMPPError, load_mpp_overrides, resolve_mpp
from needlework.slides.reader import ArrayReader, SlideOpenError, SlideReader, list_slides, open_slide
from needlework.slides.synthetic import SyntheticSlideSpec, make_synthetic_cohort, make_synthetic_slide
from needlework.slides.tiling import TilingConfig, tile_slide
from needlework.slides.tissue import TissueParams, segment_tissue

__all__ = [
    "ArrayReader",
    "EmbedJobConfig",
    "MissingMPPError",
    "SlideJobError",
    "SlideOpenError",
    "SlideReader",
    "SyntheticSlideSpec",
    "TileJobConfig",
    "TilingConfig",
    "TissueParams",
    "embed_tiles",
    "export_heatmap",
    "list_slides",
    "load_mpp_overrides",
    "make_synthetic_cohort",
    "make_synthetic_slide",
    "open_slide",
    "resolve_mpp",
    "run_embedding",
    "run_tiling",
    "scores_from_model",
    "segment_tissue",
    "tile_slide",
]
