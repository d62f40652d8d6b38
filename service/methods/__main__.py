"""`python -m service.methods`: the README's table of endpoints, parameters and defaults."""

from service.methods import markdown_table

print(markdown_table())
