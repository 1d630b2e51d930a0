"""Stage 1, ingest: source roots → units of work → de-identified canonical volumes.

discover.py     walk the roots (one ``FileEntry`` per file, keyed path hash) and scan DICOM
                headers without decoding pixels; file_index.py: the kept index of a build's
                files (size, mtime, keyed header summary) that lets a resume scan only
                what changed
units.py        group files into ``UnitTask`` s (a DICOM series or a NIfTI volume, each with
                its label source); collections.py and layouts/*.json: public layouts
                (MSD, nnU-Net v2, TotalSegmentator, BraTS)
read.py         ``read_volume`` / ``read_dicom_series`` / ``read_nifti``: budgets (codestream.py:
                decoded size from JPEG / JPEG-LS / J2K / deflate bytes, before decoding),
                decode (dicom_io, dicom_pixels; header values validated where parsed in
                dicom_values.py), Siemens mosaics de-tiled (mosaic.py), assemble
                (dicom_series), tilted stacks resampled (tilt.py), NIfTI voxels within their
                budget (nifti_voxels.py), de-identify (deid) →
                ``Volume`` (volume.py: array in closest-canonical RAS+, affine, clean meta)
"""
