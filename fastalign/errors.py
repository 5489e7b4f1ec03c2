"""The errors that are the user's mistake (a config, an option, a data file, a model name, a
checkpoint to resume from), as opposed to bugs.

The command line prints these as `fastalign: error: <message>` and exits with status 2, without
a traceback (FASTALIGN_DEBUG=1 shows it); anything else is an internal error and keeps its
traceback. So a message carried by one of these must say everything the user needs: which option
or file, what was wrong, and what is accepted.

Each class also derives from the built-in exception that code catching errors would expect
(ValueError, FileNotFoundError), so library callers are unaffected by the distinction.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: a mistake in what the user asked for, reported without a traceback."""


class ConfigError(UserError, ValueError):
    """A config file, an override or an option value: unknown, of the wrong type or out of range."""


class DataError(UserError, ValueError):
    """A data file that cannot be read as its declared format (the message names file:line)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data file, config file or bundled resource that does not exist."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model name that is neither a known name, a local directory, a .gguf file nor a hub id
    that loads."""


class ResumeError(UserError, FileNotFoundError):
    """trainer.resume_from names no checkpoint (a damaged one raises
    fastalign.trainer.checkpoint.CheckpointError, also a UserError)."""


def message(exc: BaseException) -> str:
    """The text of an exception as the user should read it (KeyError repr-quotes its message)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and type(exc).__str__ is KeyError.__str__:
        return str(exc.args[0])
    return str(exc)
