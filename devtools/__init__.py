"""Development and test tools that do not ship in the package (run from the repository root)."""
