"""Model-free runtime pieces shared by every layer (command-line error reporting, output files)."""
