"""Reading input tensors and writing results.

===================  ========================================================================
:mod:`.sources`      the bytes of one input, bounded by the input limit (``--max-input-bytes``)
:mod:`.read`         tensor files by content: sniffing, the reader table, ``load_tensor(s)``
:mod:`.npy`          the ``.npy`` / ``.npz`` readers, their header checks, memory-mapped ``.npy``
:mod:`.archives`     zip archives checked before use: errors in words, CRC-32s, record sizes
:mod:`.write`        results: the writer table, output checks, atomic writes
:mod:`.inputs`       the model's arguments from INPUT, ``--key`` and ``--input``
:mod:`.stream`       per-sample results streamed to disk chunk by chunk; resume; ranks
:mod:`.streamfile`   a streamed result's file: formats, header, the finished file as a tensor
:mod:`.ranks`        the ranks of a ``torchrun`` job: world size and rank, errors passed between them
:mod:`.transfer`     finished chunks from the device to the file (CUDA: side stream, overlap)
:mod:`.records`      the files beside a streamed result, fingerprints, running statistics
===================  ========================================================================

Nothing here runs code from a data file: ``torch.load(weights_only=True)`` and
``np.load(allow_pickle=False)`` only.
"""

from jaccli.io.sources import Source, is_safetensors, read_source
from jaccli.io.read import (
    DTYPES,
    MIN_TORCH,
    READERS,
    SUFFIXES,
    archive_kind,
    as_float,
    check_torch_version,
    load_tensor,
    load_tensors,
    read_torch_object,
    resolve_dtype,
    safetensors_metadata,
)
from jaccli.io.write import (
    WRITERS,
    check_output,
    check_writable,
    output_format,
    save_tensors,
    write_atomically,
)
from jaccli.io.inputs import (
    InputSpec,
    gather_inputs,
)

from jaccli.io.stream import (
    FileSink,
    Stream,
    can_stream,
)

__all__ = [
    "FileSink",
    "Stream",
    "can_stream",
    "DTYPES",
    "InputSpec",
    "MIN_TORCH",
    "READERS",
    "SUFFIXES",
    "Source",
    "WRITERS",
    "archive_kind",
    "as_float",
    "check_output",
    "check_torch_version",
    "check_writable",
    "gather_inputs",
    "is_safetensors",
    "load_tensor",
    "load_tensors",
    "output_format",
    "read_source",
    "read_torch_object",
    "resolve_dtype",
    "safetensors_metadata",
    "save_tensors",
    "write_atomically",
]
