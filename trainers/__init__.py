"""Trainers found by nnU-Net through nnUNet_extTrainer.

nnU-Net imports every module of this folder as a top-level module and removes it from sys.modules
after the look-up, so the modules here must not import each other: each one imports its building
blocks from ``nnunet_weak``.
"""
