"""The error every data reader raises: one line naming the file and dataset.

May import: the standard library only.
"""


class DataError(ValueError):
    """The data on disk does not match the layout or the configuration."""
