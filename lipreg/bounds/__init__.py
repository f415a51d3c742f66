"""Graph bounds: AutoLip (paper Alg. 1) and SeqLip (paper eq. 8) over the captured graph."""
