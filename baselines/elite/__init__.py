"""ELITE (Wei et al., ICCV 2023) as an f2d-bench method: see method.py and README.md."""
