"""Data: the release's HDF5 layout (SPEC section 7) and a synthetic generator for it."""

from rwmn.data.movieqa import DataError, MovieQAData, QABatch

__all__ = ["DataError", "MovieQAData", "QABatch"]
