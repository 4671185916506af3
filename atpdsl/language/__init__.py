"""The language: grammar loading, parser, syntax tree, checker, diagnostics, pairs and the compiler to a Plan."""
