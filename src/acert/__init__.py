"""acert: adaptive certified training (ACERT) with sound bound propagation and certified radii."""
