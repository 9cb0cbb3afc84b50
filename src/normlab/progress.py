"""Progress bars: tqdm's notebook bars in Jupyter where ipywidgets is installed, text bars
everywhere else, without the warning tqdm gives in Jupyter without ipywidgets (it falls back
to the text bar then anyway; the warning would only show the user a path inside tqdm)."""

import warnings

from tqdm.std import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
