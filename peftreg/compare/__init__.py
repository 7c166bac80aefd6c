# SPDX-License-Identifier: Apache-2.0
"""``peftreg compare``: every installed method fine-tuned the same way, side by side.

:mod:`~peftreg.compare.assets` finds the offline model and data packages,
:mod:`~peftreg.compare.tasks` turns them into a task (model, data, metric),
:mod:`~peftreg.compare.runner` trains and measures each method, and
:mod:`~peftreg.compare.report` prints the table and writes the JSON and the plot.
"""

from peftreg.compare.runner import run_comparison
from peftreg.compare.runs import MethodResult, RunSettings

__all__ = ["MethodResult", "RunSettings", "run_comparison"]
