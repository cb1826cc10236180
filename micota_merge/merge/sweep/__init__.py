"""Merge ratios (x densities) against CoT length and accuracy; the chosen TA."""
