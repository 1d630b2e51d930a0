"""python -m workflows.sample_sources

Prints the folders of real medical files that installed packages ship, one per line: pydicom's
test files (86 DICOM files: compressed, truncated, RTSTRUCT, SEG, multi-frame, ...), nibabel's
test data (NIfTI-1/2, 4D, plus many non-NIfTI formats that end as skipped rows) and nilearn's
bundled MNI152 templates. The quick start feeds them to build-corpus beside the phantoms.
"""

from __future__ import annotations

from pathlib import Path


def package_sources() -> list[Path]:
    """Folders inside installed packages holding real DICOM / NIfTI files."""
    import nibabel
    import nilearn
    import pydicom

    return [
        Path(pydicom.__file__).parent / "data" / "test_files",
        Path(nibabel.__file__).parent / "tests" / "data",
        Path(nilearn.__file__).parent / "datasets" / "data",
    ]


def main() -> int:
    for p in package_sources():
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
