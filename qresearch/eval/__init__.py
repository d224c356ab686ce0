"""qresearch.eval"""
