"""The lipcheck error family: every known failure maps to one line on stderr and an exit code.

| exception            | exit code | meaning                                                |
|----------------------|-----------|--------------------------------------------------------|
| ``UsageError``       | 2         | bad command-line usage or option value                 |
| ``InputError``       | 2         | the model file is missing, unreadable or invalid       |
| ``UntrustedInputError`` | 2      | loading the file would run code; needs ``--trust``     |
| anything else        | 3         | an internal error (a bug in lipcheck)                  |

Exit code 1 is reserved for a failed gate (a check that ran and did not pass).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class LipcheckError(Exception):
    """Base of every error lipcheck reports as one line; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str) -> None:
        # One line only: the CLI prints the message verbatim on stderr.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(LipcheckError):
    """An option or argument has a value lipcheck cannot use."""


class InputError(LipcheckError):
    """The model file is missing, unreadable, truncated or not a model lipcheck knows."""


class UntrustedInputError(InputError):
    """Loading the file would execute code from it; the user must pass ``--trust``."""
