"""The `sonett` command."""
