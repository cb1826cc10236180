"""Question sets, chat formatting, Mix Distillation."""
