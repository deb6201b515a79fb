"""fastkv's command line: parse arguments, call core/, render results."""
