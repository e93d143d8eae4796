"""The `gpt2kern` command line and its benchmark."""
