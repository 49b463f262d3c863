"""Typed exceptions raised by the library.

Every message names the offending value and what would have been accepted, so the
command-line scripts can print it as a single line and exit with status 2.
"""

from __future__ import annotations


class NeuronSegError(Exception):
    """Base class of every error this package raises on bad input."""


class VolumeError(NeuronSegError):
    """A container or dataset is missing, unreadable or of the wrong kind."""


class GeometryError(NeuronSegError, ValueError):
    """A box, block, shape or tile size that does not fit the data or the model."""


class ModelError(NeuronSegError):
    """A model file that is missing, corrupt or not this U-Net."""


class ScalingError(NeuronSegError, ValueError):
    """An intensity scaling factor that cannot be used (NaN, infinite, not positive, or one that
    overflows or underflows float32 on the input's values)."""


class InputValueError(NeuronSegError, ValueError):
    """Input voxels the model cannot take: NaN or infinite values in a float dataset."""


class ChunkError(VolumeError):
    """An input chunk file that cannot be read or decoded (truncated, garbage, unreadable)."""


class PrecisionError(NeuronSegError, ValueError):
    """A compute precision this machine cannot run the model in (or one that is not known)."""


class ParameterError(NeuronSegError, ValueError):
    """A numeric setting outside its allowed range (thresholds, sizes, seeds, thread counts)."""


class OutputError(NeuronSegError):
    """An output dataset that is missing, incompatible or cannot be written."""


class OutputExistsError(OutputError):
    """An output that exists already and differs from what would be written; it is replaced only on request."""


class CompressionError(NeuronSegError, ValueError):
    """A compression name or level that cannot be written to N5 (or read back by Java N5)."""


class TiffError(NeuronSegError):
    """TIFF input that is missing, unreadable, truncated or inconsistent (slice shapes, dtypes, names)."""


class DatasetError(NeuronSegError):
    """A training region or training dataset that is missing or malformed."""
