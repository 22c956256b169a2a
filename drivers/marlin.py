"""Moved to the package `drivers.printer` (issue 19); its names are re-exported here for one release."""

from drivers.printer import *  # noqa: F403
from drivers.printer import __all__ as __all__
