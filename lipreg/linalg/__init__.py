"""Linear algebra of linear operators: warm power steps, the Krylov solver, and certified spectral norms."""
