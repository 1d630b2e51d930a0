"""Tests for pipeline.images.slicing: slice selection, display orientation, geometry, resize, PNG."""

from __future__ import annotations

import importlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.images.png import encode_png
from pipeline.images.slicing import (
    PLANE_AXIS,
    PLANES,
    SliceConfig,
    cut_images,
    extract_plane,
    iter_plane_slices,
    label_presence,
    pixel_spacing,
    plane_geometry,
    resize_longest,
    select_slices,
    slice_thickness,
)
from pipeline.ingest.volume import Volume, to_canonical


def decode(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


def oblique_affine(spacing=(0.7, 0.7, 5.0), offset=(-120.5, 33.25, -410.0)) -> np.ndarray:
    """A non-trivial but still RAS-closest affine: small rotations, anisotropic voxels, offset."""
    a, b = np.deg2rad(7.0), np.deg2rad(-4.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(spacing)
    aff[:3, 3] = offset
    return aff


def ras(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.append(np.asarray(ijk, dtype=np.float64), 1.0))[:3]


# --- slice selection -------------------------------------------------------------------------


def test_select_slices_labelled_plus_every_kth():
    has = np.zeros(12, dtype=bool)
    has[[4, 5, 10]] = True
    assert select_slices(has, 3).tolist() == [0, 3, 4, 5, 6, 9, 10]
    assert select_slices(has, 0).tolist() == [4, 5, 10]
    assert select_slices(np.zeros(7, dtype=bool), 3).tolist() == [0, 3, 6]
    assert select_slices(np.zeros(7, dtype=bool), 0).tolist() == []
    with pytest.raises(ValueError, match="every_k"):
        select_slices(has, -1)


def test_selection_from_a_label_map_per_plane():
    labels = np.zeros((6, 7, 8), dtype=np.int32)
    labels[2, 3, 5] = 4
    labels[2, 6, 6] = 1
    assert np.flatnonzero(label_presence(labels, "axial")).tolist() == [5, 6]
    assert np.flatnonzero(label_presence(labels, "coronal")).tolist() == [3, 6]
    assert np.flatnonzero(label_presence(labels, "sagittal")).tolist() == [2]
    ramp = np.arange(labels.size, dtype=np.float32).reshape(labels.shape)  # signal everywhere
    vol = Volume(ramp, np.eye(4), "CT", labels=labels)
    cfg = SliceConfig(planes=("axial",), every_k=4)
    assert [im.slice_index for im in cut_images(vol, cfg)] == [0, 4, 5, 6]
    cfg0 = SliceConfig(planes=("axial", "sagittal"), every_k=0)
    got = [(im.plane, im.slice_index) for im in cut_images(vol, cfg0)]
    assert got == [("axial", 5), ("axial", 6), ("sagittal", 2)]
    unlabelled = Volume(ramp, np.eye(4), "CT")
    assert cut_images(unlabelled, cfg0) == []
    assert [im.slice_index for im in cut_images(unlabelled, cfg)] == [0, 4]


# --- orientation ------------------------------------------------------------------------------


def test_display_orientation_radiological():
    shape = (20, 30, 40)  # distinct sizes catch transposed axes
    arr = np.full(shape, -1000.0, dtype=np.float32)
    i, j, k = 17, 25, 33  # patient Right, Anterior, Superior
    arr[i, j, k] = 1000.0
    labels = np.zeros(shape, dtype=np.int32)
    labels[i, j, k] = 3
    vol = Volume(arr, np.diag([0.7, 0.8, 2.0, 1.0]), "CT", labels=labels, label_names={3: "dot"})
    cfg = SliceConfig(planes=PLANES, every_k=0)
    images = {im.plane: im for im in cut_images(vol, cfg)}
    expected = {  # (shape, (row, col)) of the bright voxel in each image
        "axial": ((30, 20), (30 - 1 - j, 20 - 1 - i)),  # rows A→P, cols R→L
        "coronal": ((40, 20), (40 - 1 - k, 20 - 1 - i)),  # rows S→I, cols R→L
        "sagittal": ((40, 30), (40 - 1 - k, 30 - 1 - j)),  # rows S→I, cols A→P
    }
    for plane, (img_shape, (row, col)) in expected.items():
        im = images[plane]
        pix = decode(im.png)
        assert pix.shape == img_shape == (im.height, im.width)
        assert np.argwhere(pix == 255).tolist() == [[row, col]]
        assert np.argwhere(im.labels == 3).tolist() == [[row, col]]
        assert im.labels.dtype == np.int32
        h, w = img_shape
        assert row < h / 2 and col < w / 2  # Right/Anterior/Superior all land top-left here
    assert [images[p].slice_index for p in ("sagittal", "coronal", "axial")] == [i, j, k]


def test_extract_plane_views_and_errors():
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    ax = extract_plane(arr, "axial", 1)
    assert ax.shape == (3, 2) and np.shares_memory(ax, arr)
    assert ax[0, 0] == arr[1, 2, 1]  # top-left: most Right (i max), most Anterior (j max)
    with pytest.raises(ValueError, match="plane"):
        extract_plane(arr, "oblique", 0)
    with pytest.raises(IndexError):
        extract_plane(arr, "axial", 4)
    with pytest.raises(ValueError, match="X, Y, Z"):
        extract_plane(arr[..., None], "axial", 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8, np.int32, bool])
def test_chunked_axial_slices_equal_extract_plane(dtype):
    rng = np.random.default_rng(3)
    arr = (
        (rng.normal(0, 100, size=(9, 7, 11)) > 0)
        if dtype is bool
        else rng.normal(0, 100, size=(9, 7, 11))
    )
    arr = arr.astype(dtype)
    chosen = [0, 2, 3, 7, 10]
    for plane in PLANES:
        axis_len = arr.shape[PLANE_AXIS[plane]]
        idx = [c for c in chosen if c < axis_len]
        got = list(iter_plane_slices(arr, plane, idx, chunk_bytes=2 * 9 * 7 * arr.itemsize))
        assert [g[0] for g in got] == idx
        for index, sl in got:
            assert sl.flags.c_contiguous and sl.dtype == arr.dtype
            np.testing.assert_array_equal(sl, extract_plane(arr, plane, index))


# --- geometry ---------------------------------------------------------------------------------


def test_pixel_to_ras_round_trip_without_resize():
    shape = (24, 28, 9)
    aff = oblique_affine()
    ijk = (5, 21, 6)
    arr = np.full(shape, -1000.0, dtype=np.float32)
    arr[ijk] = 1000.0
    vol = Volume(arr, aff, "CT")
    want = ras(aff, ijk)
    for plane in PLANES:
        axis = PLANE_AXIS[plane]
        (im,) = [
            x
            for x in cut_images(vol, SliceConfig(planes=(plane,), every_k=1))
            if x.slice_index == ijk[axis]
        ]
        ((r, c),) = np.argwhere(decode(im.png) == 255)
        got = im.pixel_to_ras @ np.array([c, r, 1.0])
        np.testing.assert_allclose(got, want, atol=1e-6)
        spacing = (0.7, 0.7, 5.0)
        col_axis, row_axis = (a for a in range(3) if a != axis)  # columns ∥ p0, rows ∥ p1
        assert im.pixel_spacing_mm == pytest.approx((spacing[row_axis], spacing[col_axis]))
        assert im.slice_thickness_mm == pytest.approx(spacing[axis])
        assert im.pixel_to_ras.shape == (3, 3) and im.pixel_to_ras.dtype == np.float64


def test_pixel_to_ras_round_trip_with_resize():
    shape = (60, 80, 10)
    aff = oblique_affine()
    arr = np.zeros(shape, dtype=np.float32)  # 0 HU background, 100 HU box: linear in soft tissue
    box = (slice(20, 30), slice(50, 62), slice(3, 7))
    arr[box] = 100.0
    centre = np.array([(s.start + s.stop - 1) / 2 for s in box])
    vol = Volume(arr, aff, "CT")
    cfg = SliceConfig(planes=PLANES, every_k=1, max_side=25)
    for plane in PLANES:
        axis = PLANE_AXIS[plane]
        index = int(centre[axis])
        (im,) = [x for x in cut_images(vol, cfg) if x.plane == plane and x.slice_index == index]
        pix = decode(im.png).astype(np.float64)
        assert max(pix.shape) == 25
        weight = pix - 102.0  # 0 HU → 102 in the soft-tissue window
        rows, cols = np.indices(pix.shape)
        c, r = (weight * cols).sum() / weight.sum(), (weight * rows).sum() / weight.sum()
        expected_ijk = centre.copy()
        expected_ijk[axis] = index
        err = np.linalg.norm(im.pixel_to_ras @ np.array([c, r, 1.0]) - ras(aff, expected_ijk))
        assert err <= 0.5 * max(im.pixel_spacing_mm)


def test_plane_geometry_scale_matches_resize_mapping():
    aff = oblique_affine()
    shape = (60, 80, 10)
    p2r = plane_geometry(aff, "axial", 4, shape, scale=(0.5, 0.25))
    base = plane_geometry(aff, "axial", 4, shape)
    # output pixel (c, r) ↔ input pixel ((c + .5)/.25 − .5, (r + .5)/.5 − .5)
    for c, r in [(0, 0), (3, 7), (14.5, 2.25)]:
        inp = np.array([(c + 0.5) / 0.25 - 0.5, (r + 0.5) / 0.5 - 0.5, 1.0])
        np.testing.assert_allclose(p2r @ [c, r, 1.0], base @ inp, atol=1e-9)
    assert pixel_spacing(p2r) == pytest.approx((1.4, 2.8))
    assert slice_thickness(aff, "axial") == pytest.approx(5.0)


# --- resize -----------------------------------------------------------------------------------


def test_resize_caps_longest_side_and_never_upscales():
    img = np.random.default_rng(0).integers(0, 255, size=(300, 120)).astype(np.uint8)
    out, (sr, sc) = resize_longest(img, 100, "area")
    assert out.shape == (100, 40) and out.dtype == np.uint8
    assert (sr, sc) == (100 / 300, 40 / 120)
    same, scale = resize_longest(img, 300, "area")
    assert same is img and scale == (1.0, 1.0)
    same, scale = resize_longest(img, 1000, "area")
    assert same.shape == (300, 120) and scale == (1.0, 1.0)
    odd, (sr, sc) = resize_longest(np.zeros((101, 37), np.float32), 50, "area")
    assert odd.shape == (50, 18) and sr == 50 / 101 and sc == 18 / 37


def test_resize_labels_nearest_keeps_integer_values():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 3, 7, 250], dtype=np.int32), size=(97, 61))
    out, scale = resize_longest(labels, 40, "nearest")
    assert out.shape == (40, 25) and out.dtype == np.int32
    assert set(np.unique(out)) <= {0, 3, 7, 250}
    rows = ((np.arange(40) + 0.5) / scale[0]).astype(int)  # output p ← input floor((p+.5)/s)
    cols = ((np.arange(25) + 0.5) / scale[1]).astype(int)
    np.testing.assert_array_equal(out, labels[np.ix_(rows, cols)])
    block = np.kron(np.array([[1, 2], [3, 4]], dtype=np.int32), np.ones((10, 10), np.int32))
    half, _ = resize_longest(block, 10, 0)
    np.testing.assert_array_equal(half, np.kron([[1, 2], [3, 4]], np.ones((5, 5), int)))
    with pytest.raises(ValueError, match="order"):
        resize_longest(labels, 10, "cubic")


# --- PNG --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,mode", [(np.uint8, "L"), (np.uint16, "I;16")])
def test_png_round_trip(dtype, mode):
    info = np.iinfo(dtype)
    img = np.random.default_rng(2).integers(0, info.max, size=(33, 47), endpoint=True).astype(dtype)
    img[0, 0], img[-1, -1] = 0, info.max
    png = encode_png(img)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode(png)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, img)
    with Image.open(io.BytesIO(png)) as pil:
        assert pil.mode == mode and pil.size == (47, 33)
        np.testing.assert_array_equal(np.asarray(pil).astype(dtype), img)
    np.testing.assert_array_equal(decode(encode_png(img[::-1, ::2])), img[::-1, ::2])
    with pytest.raises(ValueError):
        encode_png(img.astype(np.float32))


def test_sixteen_bit_images_from_cut_images():
    arr = np.linspace(-160, 240, 5 * 6 * 4, dtype=np.float32).reshape(5, 6, 4)
    vol = Volume(arr, np.eye(4), "CT")
    (im,) = cut_images(vol, SliceConfig(bits=16, every_k=10))
    pix = decode(im.png)
    assert pix.dtype == np.uint16 and pix.max() > 255


@pytest.mark.parametrize("bits", [8, 16])
def test_kept_pixels_are_what_the_png_decodes_to(bits):
    """Images of a labelled volume keep the array their PNG encodes (the labels route and
    the captions measure it instead of decoding the PNG); unlabelled volumes keep none."""
    rng = np.random.default_rng(3)
    arr = rng.normal(40, 300, (20, 24, 6)).astype(np.float32)
    labels = np.zeros(arr.shape, np.int32)
    labels[5:12, 6:15, 2:4] = 1
    cfg = SliceConfig(bits=bits, every_k=2, planes=("axial", "coronal"))
    cut = cut_images(Volume(arr, oblique_affine(), "CT", labels=labels), cfg)
    assert len(cut) > 4
    for im in cut:
        assert im.pixels.dtype == (np.uint8 if bits == 8 else np.uint16)
        np.testing.assert_array_equal(decode(im.png), im.pixels)
    assert all(im.pixels is None for im in cut_images(Volume(arr, oblique_affine(), "CT"), cfg))


# --- config and volumes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("planes", ("axial", "oblique")),
        ("planes", "axial"),
        ("planes", ("axial", "axial")),
        ("every_k", -1),
        ("every_k", 2.5),
        ("max_side", 0),
        ("bits", 12),
        ("ct_windows", ("liver",)),
        ("percentiles", (99.0, 1.0)),
        ("frame", -1),
    ],
)
def test_slice_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field) as err:
        SliceConfig(**{field: value})
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_slice_config_accepts_lists_and_is_frozen():
    cfg = SliceConfig(planes=["coronal", "axial"], ct_windows=["lung", "bone"])
    assert cfg.planes == ("coronal", "axial") and cfg.ct_windows == ("lung", "bone")
    with pytest.raises(AttributeError):
        cfg.every_k = 2  # type: ignore[misc]


def test_four_d_volume_cuts_the_configured_frame():
    arr = np.zeros((4, 5, 3, 2), dtype=np.float32)
    arr[..., 1] = 1.0
    arr[1, 2, 0, 1] = 5.0
    vol = Volume(arr, np.eye(4), "MR")
    (im,) = cut_images(vol, SliceConfig(frame=1, every_k=10))
    pix = decode(im.png)
    assert pix[5 - 1 - 2, 4 - 1 - 1] == pix.max() > pix.min()
    with pytest.raises(ValueError, match="frame"):
        cut_images(vol, SliceConfig(frame=2))


def test_labels_on_another_grid_are_rejected():
    vol = Volume(
        np.zeros((4, 4, 4), np.float32), np.eye(4), "CT", labels=np.zeros((4, 4, 3), np.int32)
    )
    with pytest.raises(ValueError, match="labels shape"):
        cut_images(vol)


# --- a real volume: nilearn's MNI152 template (ships inside the package) -----------------------


@pytest.fixture(scope="module")
def mni_volume() -> Volume:
    from nilearn.datasets import load_mni152_template

    source = getattr(
        importlib.import_module(load_mni152_template.__module__), "MNI152_FILE_PATH", None
    )
    if source is not None:  # the template is a file of the installed package: nothing is fetched
        import nilearn

        assert Path(source).is_file() and Path(nilearn.__file__).parent in Path(source).parents
    img = load_mni152_template(resolution=2)
    array, affine = to_canonical(np.asarray(img.get_fdata(), dtype=np.float32), img.affine)
    return Volume(array, affine, "MR")


def test_mni_template_cut(mni_volume):
    vol, max_side = mni_volume, 64
    images = cut_images(vol, SliceConfig(planes=PLANES, every_k=10, max_side=max_side))
    shape = vol.shape[:3]
    chosen = sum(len(range(0, n, 10)) for n in shape)
    assert chosen * 0.7 <= len(images) < chosen  # the template's all-black edge slices: not cut
    assert {im.window for im in images} == {"percentile"}
    centre_ijk = (np.array(shape) - 1) / 2.0
    centre = ras(vol.affine, centre_ijk)
    bright = 0
    for im in images:
        assert len(im.png) > 0 and im.labels is None
        pix = decode(im.png)
        assert pix.shape == (im.height, im.width) and pix.dtype == np.uint8
        assert max(pix.shape) == max_side  # every MNI side (91..109+) exceeds 64: downscaled
        bright += int(pix.max() > 0)
        axis = PLANE_AXIS[im.plane]
        mid = im.pixel_to_ras @ np.array([(im.width - 1) / 2, (im.height - 1) / 2, 1.0])
        on_slice = centre_ijk.copy()
        on_slice[axis] = im.slice_index
        np.testing.assert_allclose(mid, ras(vol.affine, on_slice), atol=1e-6)
        extent = vol.spacing[axis] * shape[axis]
        assert np.linalg.norm(mid - centre) <= extent / 2
        assert im.slice_thickness_mm == pytest.approx(2.0)
    assert bright == len(images)


@pytest.mark.parametrize("blank", [-1000.0, 3000.0, 40.0])
def test_slices_without_signal_are_not_cut(blank):
    """Air under a soft-tissue window (all black), metal (all white) or a constant slab: no
    image; the slices around it with signal are still cut, in every plane and window."""
    rng = np.random.default_rng(7)
    arr = rng.normal(40, 60, (10, 12, 8)).astype(np.float32)
    arr[:, :, 3] = blank  # one constant axial slice
    vol = Volume(arr, np.eye(4), "CT")
    cfg = SliceConfig(every_k=1, ct_windows=("soft_tissue", "lung"))
    axial = [im for im in cut_images(vol, cfg) if im.plane == "axial"]
    assert sorted({im.slice_index for im in axial}) == [0, 1, 2, 4, 5, 6, 7]
    for im in cut_images(vol, SliceConfig(every_k=1, planes=("axial", "coronal", "sagittal"))):
        assert len(np.unique(decode(im.png))) > 1
