"""nnunet-weak: label-efficient learning inside nnU-Net v2."""
