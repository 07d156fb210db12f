"""The errors a user can cause, under one base.

Both entry points (`medcare-dist ...` in cli.py, `launch/stage*.py` through training/recipe.py) catch
`MedcareError` and nothing else: they print its message as one line and exit with status 2.
Anything else is a bug and keeps its traceback. Each kind names the input at fault:

    ConfigError            an option or its value (YAML file, command line)
      CheckpointError      an input artefact (checkpoint, stage-2 base, model dir): missing
                           parts, the wrong kind for this step, or changed since it was made
      DistributedSetupError  the launcher's rank variables, the master address or port
    DataError              a data file or one of its records (names file, record, line)
    ChatTemplateError      a tokenizer's vocabulary or chat template
    SourceError            a model or dataset name: not a local path nor a usable hub repository
    FormatError            a file that is not in the format its reader expects
    InputNotFoundError     a named input file or directory does not exist (a FileNotFoundError)
    OutputExistsError      an output directory exists and is not empty (a FileExistsError)
    OutputDirError         an output directory that cannot be created or has no room for a save
      OutputInUseError     an output directory locked by another run (names the holder)
"""

from __future__ import annotations

from pathlib import Path


class MedcareError(ValueError):
    """A fault in what the user gave; the message says which input and what is wrong."""

    __str__ = BaseException.__str__  # also for the kinds mixed with KeyError, which quotes its message


class ConfigError(MedcareError):
    pass


class CheckpointError(ConfigError):
    pass


class DistributedSetupError(ConfigError):
    """The process group cannot be formed; the message says why and what to check."""


class FormatError(MedcareError):
    pass


class InputNotFoundError(MedcareError, FileNotFoundError):
    pass


class OutputExistsError(MedcareError, FileExistsError):
    pass


class OutputDirError(MedcareError, OSError):
    """An output directory that cannot be created, or has no room for what must be written."""


class OutputInUseError(OutputDirError):
    """Another run holds the output directory's lock (artefacts/run_lock.py)."""


class AdapterLayoutError(CheckpointError, KeyError):
    """Saved adapter tensors do not match the adapters built from the config (a KeyError too)."""


class ChatTemplateError(MedcareError):
    """The tokenizer has no vocabulary or chat template, or its template hides an assistant reply."""


class SourceError(MedcareError):
    """A model or dataset name that is neither a local path nor a usable hub repository."""


def location(path: str | Path | None, index: int | None = None, line: int | None = None) -> str:
    """'FILE: record I (line L)', or as much of it as is known."""
    where = [str(path)] if path is not None else []
    if index is not None:
        where.append(f"record {index}" + (f" (line {line})" if line is not None else ""))
    return ": ".join(where)


class DataError(MedcareError):
    """A data file or one of its records is unusable; the message says where and why."""

    def __init__(self, reason: str, path: str | Path | None = None, index: int | None = None,
                 line: int | None = None):
        self.reason, self.path, self.index, self.line = reason, path, index, line
        where = location(path, index, line)
        super().__init__(f"{where}: {reason}" if where else reason)

    def at(self, path: str | Path, index: int, line: int | None = None) -> "DataError":
        """The same reason, located in a file."""
        return DataError(self.reason, path, index, line)
