"""Command-line data tools: tokenize, inspect, mixture, synthetic (`python -m data_tools.<tool> --help`)."""
