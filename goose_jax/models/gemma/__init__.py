"""The Gemma family: Gemma (v1) and Gemma 2.
"""
