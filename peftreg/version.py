# SPDX-License-Identifier: Apache-2.0
"""peftreg's release, on its own so that saving an adapter can record it without importing the
whole package."""

__version__ = "0.1.0"
