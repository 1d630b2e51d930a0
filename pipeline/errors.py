"""The one exception type of the ingest pipeline.

``IngestError`` carries a machine-readable ``reason`` code (it becomes the ``reason`` column of
the ``files`` table) and a human ``problem`` text. ``str(err)`` names the file and the problem so
that a user calling :func:`pipeline.ingest.read.read_volume` directly sees which file failed; the
pipeline itself never writes ``str(err)`` anywhere: it records ``reason`` and ``problem`` next to
the keyed hash of the path, because a path may carry PHI (folder names are often patient names).
"""

from __future__ import annotations

# Reason codes used across the pipeline (documented in docs/schema.md, files.reason).
REASONS = {
    "ok": "file ingested",
    "not_medical": "neither DICOM nor NIfTI nor a known sidecar",
    "sidecar": "a sidecar (names JSON, ground truth) consumed with its volume",
    "archive": "zip/tar archive: not extracted, skipped",
    "symlink_outside_root": "symbolic link leading outside the source root, not followed",
    "not_regular": "not a regular file (socket, fifo, device, dangling link)",
    "unreadable": "file could not be opened or parsed",
    "truncated": "file ends before its declared content",
    "no_pixel_data": "DICOM object without pixel data (and not a label object)",
    "unsupported_sop": "DICOM object of a class the pipeline does not ingest",
    "missing_decoder": "no installed decoder for the transfer syntax",
    "decode_failed": "pixel decoding raised an error",
    "decode_timeout": "decoding exceeded the time limit",
    "decode_memory": "decoding exceeded the memory cap",
    "decode_crash": "the decoding process died",
    "size_budget": "declared dimensions exceed the byte budget (decompression bomb guard)",
    "geometry": "inconsistent or missing geometry (orientation, position, spacing)",
    "missing_slices": "gap in slice positions",
    "uneven_spacing": "slice spacing is not uniform",
    "gantry_tilt": "slice positions are not along the slice normal (tilted gantry)",
    "mixed_orientation": "slices of one series disagree on orientation",
    "too_few_slices": "fewer slices than the configured minimum",
    "duplicate_position": "two slices at the same position with different pixels",
    "bad_affine": "singular or sheared NIfTI affine",
    "not_a_volume": "a NIfTI container that holds no image volume (CIFTI-2)",
    "burned_in_risk": "image may carry burned-in annotations",
    "unpaired_label": "label object whose referenced image series is not in the run",
    "label_mismatch": "label map grid does not match its image volume",
    "bad_label": "label object could not be read",
    "excess_frames": "more frames in pixel data than NumberOfFrames declares",
    "encoding": "text could not be decoded in the declared character set",
    "recursion": "pathologically nested sequences",
    "internal": "unexpected error in the pipeline (a bug: please report)",
}


# Reasons that mean "valid, but not for us": the file is skipped rather than quarantined.
SKIP_REASONS = {"not_a_volume", "unsupported_sop", "not_medical", "archive", "sidecar",
                "unpaired_label", "symlink_outside_root", "not_regular"}


class IngestError(Exception):
    """A file or series that cannot be ingested.

    Attributes:
        reason: a key of :data:`REASONS`.
        problem: what is wrong, without the path.
        path: the offending file or folder (only ever shown to the caller, never persisted).
    """

    def __init__(self, reason: str, problem: str, path: object = None):
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        self.reason = reason
        self.problem = problem
        self.path = path
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{problem} [{reason}]")

    def __reduce__(self):
        # Crosses process boundaries without its path: only reason and problem travel.
        return (IngestError, (self.reason, self.problem, None))
