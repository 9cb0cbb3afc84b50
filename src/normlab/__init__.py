"""normlab: Batch, Layer and Group Normalization and the small-batch remedies, compared on
MNIST with a compact CNN, or on your own network and data.

``normlab.run("remedies", model=..., dataset=...)`` runs any experiment from Python
(``normlab.api``); the layers are in ``normlab.norms``.
"""

__version__ = "0.4.0"


def __getattr__(name: str):
    if name == "run":  # imported when first used: ``import normlab`` stays light
        from .api import run

        return run
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")
