"""Every error medcap raises for a user to act on, under one base: :class:`MedcapError`.

Each keeps its standard kind too (``ValueError`` for bad values, ``OSError`` for files and folders),
so ``except ValueError`` still works. The ``medcap`` CLI catches :class:`MedcapError`, prints the
message (which always says what to change) and exits with status 2, without a traceback.
:class:`medcap_helpers.devices.OutOfMemory` (a ``torch.cuda.OutOfMemoryError``) is one too.
"""

from __future__ import annotations


class MedcapError(Exception):
    """Base of medcap's errors: the message names the setting or file and says what to do."""


class ConfigError(MedcapError, ValueError):
    """A configuration value is not valid, or two values do not fit together."""


class DataSourceError(MedcapError, ValueError):
    """The configured data cannot be used as asked (a file, a column, a setting)."""


class ReportParseError(MedcapError, ValueError):
    """A report file is not valid Open-i XML; the message names the file."""


class ImageLoadError(MedcapError, ValueError):
    """An image file cannot be used; the message names the file and the reason."""


class ProcessorLoadError(MedcapError, OSError):
    """A BLIP processor cannot be loaded."""


class ModelLoadError(MedcapError, OSError):
    """A model or adapter cannot be loaded; the message says what to check."""


class AdapterNotFound(ModelLoadError, FileNotFoundError):
    """The adapter folder is missing or incomplete."""


class StageNotRun(MedcapError, FileNotFoundError):
    """A stage needs the output of an earlier stage that is not in the run folder."""


class RunFolderError(MedcapError, OSError):
    """The run folder cannot be created or written."""


class RunLocked(RunFolderError):
    """Another process is running in the same run folder."""


class DownloadError(MedcapError, OSError):
    """A download failed in a way a retry will not fix."""


class BudgetTooSmall(MedcapError, RuntimeError):
    """No training setting fits the VRAM budget."""


class StageFailed(MedcapError, RuntimeError):
    """A notebook stopped with an error; the message points at the executed notebook."""
