"""The T5 family: v1.0, v1.1 / LM-adapted, FLAN-T5.
"""
