"""Training entry points of the three stages (`difftumor train ...`) and their shared utilities
(:mod:`backend.train.common`)."""
