"""Kept so plugins written against adapterkit 0.1 still import: ``adapterkit.testing``.

The helpers live in :mod:`adapterkit.plugin_api.testing`.
"""

from adapterkit.plugin_api.testing import *  # noqa: F401,F403
from adapterkit.plugin_api.testing import __all__  # noqa: F401
