"""A plugin whose import fails, as one with a missing dependency would."""

raise ImportError("peftreg-broken needs the package 'not_installed_anywhere'")
