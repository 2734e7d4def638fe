"""The `streamlearn` command and its subcommands."""
