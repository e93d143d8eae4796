def load(n): pass
