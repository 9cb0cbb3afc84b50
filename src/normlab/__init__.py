"""normlab: Batch, Layer and Group Normalization compared on MNIST with a compact CNN."""

__version__ = "0.4.0"
