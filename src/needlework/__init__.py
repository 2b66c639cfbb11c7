"""needlework: classify tiny objects in very large images with PyTorch.

Public entry points: :func:`create_model` / :func:`list_models` (the model registry), the
datasets in :mod:`needlework.data`, the operators in :mod:`needlework.ats` and :mod:`needlework.topk`,
and the ``needlework`` command line (:mod:`needlework.cli`).
"""

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

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_dataset",
    "create_encoder",
    "create_model",
    "list_datasets",
    "list_encoders",
    "list_models",
    "register_dataset",
    "register_encoder",
    "register_model",
]
