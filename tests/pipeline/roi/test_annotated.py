"""Shapes drawn on stored frames follow the pixels: pixel-exact checks of the frame → image map.

Each case writes a real DICOM series (or a projection image), reads and cuts it as the build
does, and checks, for the cut image of the annotated slice, that

* the whole frame's box maps to the whole image, exactly (edges, not centres);
* without resizing, a one-pixel box around every stored pixel lands on the image pixel that
  holds that stored pixel's value (so every flip and transpose is the pixels' own);
* a polygon and a mask land on the same pixels as the box they outline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from factories import write_series

from pipeline.images.slicing import SliceConfig, cut_images
from pipeline.ingest.deid import Deidentifier
from pipeline.ingest.read import read_dicom_series
from pipeline.roi.annotated import (
    frame_to_image,
    transform_box,
    transform_mask,
    transform_polygon,
)

IOPS = {"standard": (1, 0, 0, 0, 1, 0), "flipped": (-1, 0, 0, 0, -1, 0),
        "transposed": (0, 1, 0, 1, 0, 0), "coronal": (1, 0, 0, 0, 0, -1)}


def _read(tmp_path, iop, rows=12, cols=9, n=3):
    """A series whose stored pixel values are unique: value = 1000·k + 10·r + c (< 4000); MR, so
    each slice is windowed over its whole range (``percentiles`` (0, 100)): no value clips."""
    vol = np.array([[[k * 1000 + r * 10 + c for c in range(cols)] for r in range(rows)]
                    for k in range(n)], np.int16) - 1024
    paths = write_series(tmp_path / "s", vol, iop=iop, spacing=(0.8, 0.7), Modality="MR")
    read = read_dicom_series(paths, Deidentifier(b"k" * 32))
    return vol, read


@dataclass(frozen=True)
class _Shape:
    kind: str
    coords: tuple


@pytest.mark.parametrize("name", list(IOPS))
def test_every_stored_pixel_lands_on_its_own_value(tmp_path, name):
    vol, read = _read(tmp_path, IOPS[name])
    plane = "coronal" if name == "coronal" else "axial"
    cfg = SliceConfig(planes=(plane,), every_k=1, bits=16, max_side=512,
                      percentiles=(0.0, 100.0))
    images = cut_images(read.volume, cfg)
    rows, cols = vol.shape[1:]
    for (pos, _frame), (k, _) in read.frames.items():
        placed = [(img, frame_to_image(read.grid_affine, k, img.pixel_to_ras,
                                       img.slice_thickness_mm)) for img in images]
        placed = [(img, m) for img, m in placed if m is not None]
        assert len(placed) == 1, "exactly one cut image holds the frame"
        img, m = placed[0]
        assert transform_box((0, 0, cols, rows), m, (img.height, img.width)) == \
            pytest.approx([0, 0, img.width, img.height], abs=1e-9)
        # the 16-bit PNG holds windowed values: compare ranks instead of values
        stored = vol[pos]
        shown = np.asarray(img.pixels if img.pixels is not None else _decode(img))
        for r in range(rows):
            for c in range(cols):
                x0, y0, x1, y1 = transform_box((c, r, c + 1, r + 1), m, shown.shape)
                assert (x1 - x0, y1 - y0) == pytest.approx((1, 1), abs=1e-9)
                u, v = int(round(x0)), int(round(y0))
                want = np.argsort(np.argsort(stored.ravel()))[r * cols + c]
                got = np.argsort(np.argsort(shown.ravel(), kind="stable"))[v * shown.shape[1] + u]
                assert want == got, (name, r, c)


def _decode(img):
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(img.png)))


@pytest.mark.parametrize("name", list(IOPS))
def test_polygon_and_mask_land_where_their_box_does(tmp_path, name):
    vol, read = _read(tmp_path, IOPS[name], rows=20, cols=16)
    plane = "coronal" if name == "coronal" else "axial"
    images = cut_images(read.volume, SliceConfig(planes=(plane,), every_k=1, max_side=512,
                                                 percentiles=(0.0, 100.0)))
    _, (k, _) = next(iter(read.frames.items()))
    img, m = next((i, mm) for i in images if (mm := frame_to_image(
        read.grid_affine, k, i.pixel_to_ras, i.slice_thickness_mm)) is not None)
    shape = (img.height, img.width)
    box = (3, 5, 11, 14)  # columns 3..10, rows 5..13 of the stored frame
    stored = np.zeros((20, 16), bool)
    stored[5:14, 3:11] = True
    x0, y0, x1, y1 = transform_box(box, m, shape)
    want = np.zeros(shape, bool)
    want[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))] = True
    poly = transform_polygon((3, 5, 11, 5, 11, 14, 3, 14), m, shape)
    assert np.array_equal(transform_mask(stored, m, shape), want)
    assert np.array_equal(poly, want)  # edges along pixel edges: exactly the pixels outlined


def test_a_frame_of_another_slice_or_plane_has_no_map(tmp_path):
    _, read = _read(tmp_path, IOPS["standard"])
    images = cut_images(read.volume, SliceConfig(planes=("axial", "coronal"), every_k=1,
                                                 percentiles=(0.0, 100.0)))
    k = 1
    maps = [frame_to_image(read.grid_affine, k, i.pixel_to_ras, i.slice_thickness_mm)
            for i in images]
    assert sum(m is not None for m in maps) == 1
    hit = images[[m is not None for m in maps].index(True)]
    assert hit.plane == "axial"
