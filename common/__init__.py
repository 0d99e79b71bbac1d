"""FedContrast core shared by server and clients: models, loss, data, metrics, config.

Nothing in this package imports Flower or gRPC.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedcontrast")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
