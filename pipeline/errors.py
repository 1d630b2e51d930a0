"""The one exception type of the ingest pipeline, and the table of reason codes.

An error is a code, never a quotation. ``IngestError`` carries a ``reason`` (a key of
:data:`REASONS`: the ``reason`` column of the ``files`` table) and an optional ``detail``: a
string literal written in the code that names which check failed ("RTSTRUCT has no
CLOSED_PLANAR contour"), never text built from values. Nothing read from a file or its path
(names, UIDs, header values, shapes, library exception texts that echo them) is ever put into
an error: folder names are often patient names, and header fields hold whatever a scanner or a
person typed. ``tests/pipeline/test_errors.py`` walks the code base and fails on any
``IngestError`` whose detail is not a literal, and on any log call that formats a value.

What is persisted (the ``files.error`` column) is :attr:`IngestError.message`: ``detail`` or
the reason's fixed text. ``str(err)`` additionally names the path, for a user who called
:func:`pipeline.ingest.read.read_volume` on their own file; the pipeline never writes
``str(err)`` anywhere, and the path does not survive pickling (``__reduce__``).
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
    "size_budget": "declared dimensions or the stored size exceed the byte budget (bomb guard)",
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
    "filesystem": "the operating system refused an operation on this path (loop, permission, "
                  "vanished, unencodable name)",
    "bad_scaling": "rescale slope/intercept not finite, or not finite in the pixel type they make",
    "no_signal": "no finite voxel, or every voxel equal",
    "out_of_memory": "the unit's worker was killed for lack of memory (not a fault of the file); "
                     "left for a rerun with more memory",
    "internal": "unexpected error in the pipeline (a bug: please report)",
}


# Reasons that mean "valid, but not for us": the file is skipped rather than quarantined.
SKIP_REASONS = {"not_a_volume", "unsupported_sop", "not_medical", "archive", "sidecar",
                "unpaired_label", "symlink_outside_root", "not_regular"}


class IngestError(Exception):
    """A file or series that cannot be ingested.

    Attributes:
        reason: a key of :data:`REASONS`.
        detail: optional sub-cause, a string literal from the code (never built from values).
        path: the offending file or folder (only ever shown to the caller, never persisted,
            dropped when the error is pickled).
    """

    def __init__(self, reason: str, detail: str | None = None, path: object = None):
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")  # a bug in the code
        if detail is not None and not isinstance(detail, str):
            raise TypeError("IngestError detail must be a string literal")
        self.reason = reason
        self.detail = detail
        self.path = path
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The persisted text (``files.error``): the literal detail, else the reason's text."""
        return self.detail or REASONS[self.reason]

    # The name earlier callers used for the persisted text.
    problem = message

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"{where}{self.message} [{self.reason}]"

    def __reduce__(self):
        # Crosses process boundaries without its path: only reason and literal detail travel.
        return (IngestError, (self.reason, self.detail))
