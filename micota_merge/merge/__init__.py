"""The teacher assistant: recipes, the build through mergekit, pre-flight, one-pass and sweep."""
