"""Policy: the model (model.py), the parser with file:line errors (parse.py), and the compiler
to datapath map entries (compile lives with the datapath ABI it targets). Pure: no kernel, no I/O
beyond reading the file."""
