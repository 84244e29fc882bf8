"""Loss functions of the nnunet-weak methods, each with its equation and shape contract."""
