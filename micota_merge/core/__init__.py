"""What every stage shares: errors, manifests, ownership, content identity, options, checkpoints."""
