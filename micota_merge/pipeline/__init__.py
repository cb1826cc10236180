"""`run`: the whole method from one file, each stage skipped when done."""
