"""Objective evaluation of synthesised speech against reference recordings."""
