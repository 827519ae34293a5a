"""One adapter module per upstream kind."""
