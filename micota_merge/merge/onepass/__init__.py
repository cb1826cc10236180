"""Every point of a sweep from one read of the inputs, bit for bit mergekit's."""
