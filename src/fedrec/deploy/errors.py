"""The one exception type of ``fedrec.deploy``."""

from fedrec.errors import FedrecError


class DeployError(FedrecError):
    """A certificate, key, address or file a deployment needs is missing, wrong or unusable.

    The message is one line naming the file or address at fault and how to fix it, so the CLI
    prints it as is.
    """
