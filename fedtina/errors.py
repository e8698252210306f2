"""Exceptions raised on bad input. Each message names the offending value and what to do about it."""


class FedtinaError(Exception):
    """Base class for every error fedtina raises on purpose."""


class UnknownClassError(FedtinaError, KeyError):
    """A class name that the dataset (or the zoo, or the encoder cache) does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LabelSetError(FedtinaError, ValueError):
    """An empty or duplicated label set, or one larger than the configured maximum."""


class DatasetUnavailableError(FedtinaError, RuntimeError):
    """A dataset that is missing on disk and cannot be downloaded here."""


class EncoderUnavailableError(FedtinaError, RuntimeError):
    """Text-encoder weights that are missing and cannot be downloaded here."""


class CorruptFileError(FedtinaError, RuntimeError):
    """A checkpoint, zoo blob or zoo index that fails to load or to verify."""
