"""Synthetic CT studies for demos, tests and benchmarks (not a stage: nothing in ``pipeline``
imports this package).

anatomy.py  the anatomy on a RAS+ voxel grid
studies.py  ``make_phantoms``: studies written as real DICOM series + NIfTI label maps
"""
