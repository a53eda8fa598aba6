"""Offline SMLM analysis of whole data sets: `smartscope analyze INPUT... --out DIR`.

In the order the data flows: `sources` (find the stacks, read frames in
ranges) → `localize` (one chunk with the shipped model, its temporal window
carried across chunk edges) → `cluster` (the chunks on Dask, optional) →
`drift` (RCC) → `merge` → `filters` → `frc`, with `table` (the localization
table every step passes on), `picasso` (HDF5 + YAML output) and `pipeline`
(the command, resume, outputs). Dask, h5py and zarr come with the `analysis`
extra and are imported only where used, never by the daemon.
"""

from smartscope.analysis.pipeline import AnalysisError, AnalysisSettings, analyze

__all__ = ["AnalysisError", "AnalysisSettings", "analyze"]
