"""Pieces that extend nnU-Net's auto-planned networks without forking their architecture code."""
