"""The ``hf-dpruner`` command line: a dispatcher (`cli`) and one module per subcommand."""
