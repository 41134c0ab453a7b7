"""Data: the release's HDF5 layout (docs/data.md) and a synthetic generator for it.

May import: rwmn.data.movieqa.
"""

from rwmn.data.movieqa import DataError, MovieQAData, QABatch

__all__ = ["DataError", "MovieQAData", "QABatch"]
