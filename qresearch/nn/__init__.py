"""qresearch.nn"""
