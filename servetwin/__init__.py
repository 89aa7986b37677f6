"""servetwin command-line layer (thin: parsing, printing, files)."""
