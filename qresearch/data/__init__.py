"""qresearch.data"""
