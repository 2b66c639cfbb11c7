"""Pure-tensor operators (no models): sparse convolution, coordinate maps and augmentations."""
