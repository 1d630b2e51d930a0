"""Stage 2, labels: a unit's label source → an (X, Y, Z) int32 label map on its volume's grid.

nifti.py    NIfTI label maps, per-structure mask folders, names sidecars (JSON)
dicom.py    RTSTRUCT contours rasterised, DICOM SEG frames placed
annotations.py      annotation tables (VinDr, RSNA, NIH, SIIM, COCO, custom SPEC) → keyed shapes
annotation_spec.py  the SPEC grammar, reading CSV/Parquet, vetting rows
annotation_coco.py  COCO JSON rows
annotation_masks.py SIIM / COCO RLE and polygon → masks
"""
