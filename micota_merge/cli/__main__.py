"""`python -m micota_merge.cli` (what `accelerate launch -m micota_merge.cli` runs)."""

from micota_merge.cli import main

main()
