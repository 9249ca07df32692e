"""Privacy audit of the activations a device sends: inversion attacks an honest-but-curious server
can run with the weights it holds (nearest neighbour, a learned inverter, optimisation), their
metrics, and the `sftool audit privacy` driver (docs/privacy.md)."""
