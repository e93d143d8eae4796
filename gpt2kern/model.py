def optimize(m): pass
def restore(m): pass
