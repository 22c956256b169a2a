"""edge-agent: the daemon core."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
