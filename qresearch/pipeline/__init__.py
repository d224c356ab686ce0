"""qresearch.pipeline"""
