"""The errors a user can cause, under one base.

Both entry points (`medcare-dist ...` in cli.py, `launch/stage*.py` through recipe.py) catch
`MedcareError` and nothing else: they print its message as one line and exit with status 2.
Anything else is a bug and keeps its traceback. Each kind names the input at fault:

    ConfigError            an option or its value (YAML file, command line)
      CheckpointError      an input artefact (checkpoint, stage-2 base, model dir): missing
                           parts, the wrong kind for this step, or changed since it was made
      DistributedSetupError  the launcher's rank variables, the master address or port
    DataError, ChatTemplateError   (medcare_dist/data.py) a data file or record; a tokenizer's
                           chat template
    FormatError            a file that is not in the format its reader expects
    InputNotFoundError     a named input file or directory does not exist (a FileNotFoundError)
    OutputExistsError      an output directory exists and is not empty (a FileExistsError)
"""

from __future__ import annotations


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


class AdapterLayoutError(CheckpointError, KeyError):
    """Saved adapter tensors do not match the adapters built from the config (a KeyError too)."""
