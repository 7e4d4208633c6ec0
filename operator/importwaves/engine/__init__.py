"""The wave coordination engine: pure decisions (decide.py) and the thin shell around them."""
