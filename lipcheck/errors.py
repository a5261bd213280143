"""The lipcheck error family: every known failure maps to one line on stderr and an exit code.

The CLI prints ``lipcheck: error: <message>`` (one line; stdout stays empty and no file is
written) and returns the exception's exit code:

| exception                 | exit | when                                                            |
|---------------------------|------|-----------------------------------------------------------------|
| ``UsageError``            | 2    | an option or argument has a value lipcheck cannot use           |
| ``InputError``            | 2    | the model file is missing, empty, truncated, damaged or invalid |
| ``UntrustedInputError``   | 2    | loading the file would run code from it; needs ``--trust``      |
| ``UnsupportedInputError`` | 2    | a readable file of a kind lipcheck does not analyse             |
| anything else             | 3    | an internal error (a bug); ``LIPCHECK_DEBUG=1`` shows traceback |

``UntrustedInputError`` and ``UnsupportedInputError`` subclass ``InputError``, so
``except InputError`` catches every problem with the file itself. Exit code 1 is reserved
for a failed gate (a check that ran and did not pass). Each message names the file and
what was expected and found; an ``UntrustedInputError`` names the offending Python global
where it is known (``posix.system``, ``argparse.Namespace``, ...).

Which input raises which error (all exit 2):

``InputError``
    a missing path, a directory, FIFO or device, a 0-byte file; random bytes; a truncated
    zip, protobuf or pickle; a zip without its data record; a storage shorter than its
    shape; a declared size beyond the file (checked before anything is allocated); ONNX
    external data that is absolute, goes through ``..`` or a symlink, lies outside the
    model's folder, or whose offset/length is beyond the file, not the tensor's size or
    overlapping; a safetensors file whose header length, JSON, dtypes, shapes or offsets
    are invalid or inconsistent with the file.
``UntrustedInputError`` (only without ``--trust``)
    a pickle ``__reduce__`` payload (torch.save zip, legacy torch.save, raw pickle); a
    checkpoint naming non-tensor globals (``argparse.Namespace``, numpy scalars/arrays);
    a pickled ``nn.Module``; a ``torch.export`` archive; a TorchScript archive whose
    weights name Python globals, or that would be traced (``--input-shape``) or rewritten
    (``normalize``), both of which run its code. torch's own allow-list suggestions are
    never applied.
``UnsupportedInputError``
    HDF5, GGUF, TFLite, NumPy ``.npy``, gzip/bz2/xz/zstd-compressed files, and zip
    archives that are not torch files.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class LipcheckError(Exception):
    """Base of every error lipcheck reports as one line; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, param: str | None = None) -> None:
        """``message`` may name the offending parameter as ``{param}``: the library says
        ``tol``, the command line ``--tol`` (see :meth:`for_cli`)."""
        # One line only: the CLI prints the message verbatim on stderr.
        self.template = " ".join(message.split())
        self.param = param
        super().__init__(self.template.replace("{param}", param) if param else self.template)

    @property
    def message(self) -> str:
        return str(self.args[0])

    def for_cli(self, flags: dict[str, str] | None = None) -> str:
        """The message with the parameter spelled as its command-line flag
        (``max_iters`` -> ``--max-iters`` unless ``flags`` says otherwise)."""
        if not self.param:
            return self.message
        flag = (flags or {}).get(self.param, "--" + self.param.replace("_", "-"))
        return self.template.replace("{param}", flag)


class UsageError(LipcheckError):
    """An option or argument has a value lipcheck cannot use."""


class InputError(LipcheckError):
    """The model file is missing, unreadable, truncated or not a model lipcheck knows."""


class UntrustedInputError(InputError):
    """Loading the file would execute code from it; the user must pass ``--trust``."""


class UnsupportedInputError(InputError):
    """A readable file of a kind lipcheck recognises but does not analyse (HDF5, GGUF, ...)."""
