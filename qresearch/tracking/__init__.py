"""qresearch.tracking"""
