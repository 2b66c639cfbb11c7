"""The public registry functions with every built-in registered, and :func:`load_model`.

``needlework.create_model`` and friends resolve here: importing this module imports ``needlework.models``
and ``needlework.data`` (their modules register themselves), then hands over to the leaf registry.
"""

import needlework.data
import needlework.models  # registers the built-in models and encoders
import needlework.slides.pixel_data  # registers slide_images
import needlework.slides.zoom_tiles  # noqa: F401  (registers slide_bags_multimag_pixels)
from needlework.models.checkpoint import load_model
from needlework.registry import (
    create_dataset,
    create_encoder,
    create_model,
    list_datasets,
    list_encoders,
    list_models,
    register_dataset,
    register_encoder,
    register_model,
)

__all__ = [
    "create_dataset",
    "create_encoder",
    "create_model",
    "list_datasets",
    "list_encoders",
    "list_models",
    "load_model",
    "register_dataset",
    "register_encoder",
    "register_model",
]
