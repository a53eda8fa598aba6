"""Storage: every frame to OME-TIFF, localizations to ThunderSTORM-style CSV."""

from smartscope.storage.frames import FrameWriter
from smartscope.storage.localizations import CSV_COLUMNS, LocalizationWriter, read_localizations

__all__ = ["CSV_COLUMNS", "FrameWriter", "LocalizationWriter", "read_localizations"]
