"""qresearch.models"""
