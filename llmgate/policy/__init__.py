"""
Who may use the gateway and how much: gateway keys kept as hashes in a key
file (L{keys}), per-key rate limits reserved at admission and settled by
each request's usage record (L{limits}), and budgets whose spend is rebuilt
from the usage ledger at start (L{budgets}).
"""
