"""Planning pieces that nnU-Net has no external hook for, run through its planning API."""
