"""Readers and writers: DICOM series, NIfTI."""
