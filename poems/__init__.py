"""The Tang poem corpus: downloading and verifying its JSON files (see README.md)."""
