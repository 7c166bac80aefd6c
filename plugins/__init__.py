# SPDX-License-Identifier: Apache-2.0
"""Built-in peftreg plugins. Empty on purpose: each module is registered through its own entry
point in pyproject.toml, exactly like a third-party plugin, and nothing registers on import."""
