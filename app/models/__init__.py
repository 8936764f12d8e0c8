"""Model sources (packaged, local directory, random-init) and the task heads that wrap them."""
