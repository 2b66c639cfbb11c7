"""needlework: classify tiny objects in very large images with PyTorch.

Public entry points: :func:`create_model` / :func:`list_models` (the model registry, built-ins loaded on
first use), :func:`load_model` (a model from a checkpoint), the datasets in :mod:`needlework.data`, the
operators in :mod:`needlework.ats`, :mod:`needlework.topk` and :mod:`needlework.ops`, and the
``needlework`` command line (:mod:`needlework.cli`).

Importing ``needlework`` is cheap: every name resolves on first use, so ``import needlework.slides.tiling``
or ``import needlework.ats`` pulls in neither Lightning nor (for tiling) torch.
"""

from needlework._lazy import lazy_module_getattr
from needlework._version import __version__

_API = "needlework.api"
__getattr__, __dir__ = lazy_module_getattr(
    __name__,
    {
        name: _API
        for name in (
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
        )
    },
)

__all__ = [
    "__version__",
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
