"""Stage 3, images: a volume (+ labels) → 2D images with pixel → RAS geometry.

slicing.py  slice selection, planes, resizing, ``SliceImage``
windows.py  CT windows and intensity ranges (pure functions)
png.py      the one PNG codec: encode when cutting, decode wherever a stored image is read
"""
