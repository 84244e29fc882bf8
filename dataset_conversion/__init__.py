"""Converters that write nnU-Net raw datasets with a supervision manifest."""
