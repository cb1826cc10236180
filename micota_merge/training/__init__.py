"""The student: distillation (TRL SFT) and the data-fit measure (align)."""
