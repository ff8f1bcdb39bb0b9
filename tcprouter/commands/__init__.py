"""One module per command of the command line; each has `command(args) -> exit status`.

`args` is the namespace that cli.parse_args builds (flags and TCPROUTER_* variables, validated).
"""
