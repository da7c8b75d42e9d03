"""Deliberately slow, literal NumPy float64 implementations of the lecture note, used as test
oracles. Loops over layers and nodes with the sums written out; the library never imports this."""
