"""The one exception type the data layer raises for bad input."""

from fedrec.errors import FedrecError


class DataError(FedrecError):
    """Bad or inconsistent input data.

    The message is one line that names the file or field at fault and says how to fix it,
    so a CLI can print it as is. Subclasses ``ValueError`` so generic callers still catch it.
    """
