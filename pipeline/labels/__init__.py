"""Stage 2, labels: a unit's label source → an (X, Y, Z) int32 label map on its volume's grid.

nifti.py    NIfTI label maps, per-structure mask folders, names sidecars (JSON)
dicom.py    RTSTRUCT contours rasterised, DICOM SEG frames placed
"""
